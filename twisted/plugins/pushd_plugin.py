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


serviceMaker = PushdServiceMaker()
