"""The `twistd pushd` entry point: options in, service out, nothing else."""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from pushd.config import Options


@implementer(IServiceMaker, IPlugin)
class PushdServiceMaker:
    tapname = "pushd"
    description = "Real-time push server: WebSocket topic subscribers fed from Redis."
    options = Options

    def makeService(self, options: Options):  # type: ignore[no-untyped-def]
        from pushd.service import makeService

        return makeService(options)


@implementer(IServiceMaker, IPlugin)
class PushdWorkerServiceMaker:
    tapname = "pushd-worker"
    description = "pushd job workers only: push jobs through gateways, beside the nodes (docs/jobs.md)."
    options = Options

    def makeService(self, options: Options):  # type: ignore[no-untyped-def]
        import os

        from pushd.jobs.process import make_worker
        from pushd.service import runtime_dir

        parent = getattr(options, "parent", None)
        pidfile = parent.get("pidfile") if parent is not None else None
        return make_worker(options, os.path.join(runtime_dir(pidfile), "pushd.runtime.json"), parent)


serviceMaker = PushdServiceMaker()
workerServiceMaker = PushdWorkerServiceMaker()
