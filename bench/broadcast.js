#!/usr/bin/env node
// Helper of bench/broadcast.py (see bench/README.md, "Broadcast and publish API benchmarks").
//
//   node broadcast.js --role receiver --url wss://127.0.0.1:PORT/ws --connections N [--concurrency C]
//       [--ca FILE] [--timeout S]
//   node broadcast.js --role pinger --url wss://127.0.0.1:PORT/ws [--interval-ms 10] [--ca FILE]
//
// Every line on stdout is one JSON object with an "event" field. Times are milliseconds of CLOCK_MONOTONIC
// (process.hrtime, microsecond resolution), the clock Python's time.monotonic() reads, so the orchestrator can
// compare them with its own.
//
// receiver  Opens N wss connections (at most C handshakes in flight, retried up to 5 times), prints
//           {"event":"ready"}, then waits for one {"op":"broadcast"} frame on every connection. Commands on
//           stdin, one per line: "go" (the broadcast was sent: arm the --timeout timer), "report" (report now).
//           It prints {"event":"report", ...} once every connection has the broadcast, on timeout, on "report",
//           on SIGTERM/SIGINT or when stdin closes; after the report it keeps the connections open (so that the
//           node's broadcast status is not disturbed) until stdin closes, SIGTERM, or --linger seconds pass.
// pinger    Opens one wss connection, prints {"event":"ready"}, then sends {"op":"ping","id":n} every
//           --interval-ms (a self-correcting schedule that never bursts to catch up) and records each round
//           trip with its send time. On "stop" (stdin), SIGTERM/SIGINT, stdin closing or --max-seconds it
//           stops sending, waits up to --grace-ms for the pongs still due, prints {"event":"report", ...} with
//           every sample and exits.
'use strict';

const { parseOptions, tlsClientOptions } = require('./common');
const readline = require('node:readline');

const WebSocket = require('ws');

const DEFAULTS = {
  role: 'receiver',
  url: 'wss://127.0.0.1:8443/ws',
  ca: '',
  servername: 'localhost',
  connections: 1000,
  concurrency: 32,
  timeout: 120, // receiver: seconds after "go" to wait for every broadcast frame
  connectTimeout: 300, // receiver: seconds for the whole open phase
  linger: 120, // receiver: seconds to keep the connections after reporting
  intervalMs: 10, // pinger
  graceMs: 1000, // pinger: wait for outstanding pongs after stop
  maxSeconds: 900, // pinger: stop on its own after this long
};

function parseArgs(argv) {
  const opts = parseOptions(DEFAULTS, argv);
  if (!['receiver', 'pinger'].includes(opts.role)) throw new Error(`unknown --role ${opts.role}`);
  if (opts.connections < 1 || opts.concurrency < 1 || opts.intervalMs <= 0) throw new Error('bad numbers');
  return opts;
}

/** CLOCK_MONOTONIC in milliseconds, microsecond resolution. */
function nowMs() {
  return Number(process.hrtime.bigint() / 1000n) / 1000;
}

function round3(x) {
  return Math.round(x * 1000) / 1000;
}

function emit(obj, then) {
  const line = `${JSON.stringify(obj)}\n`;
  if (then) process.stdout.write(line, then);
  else process.stdout.write(line);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function wsOptions(opts) {
  const o = { perMessageDeflate: false, skipUTF8Validation: true, handshakeTimeout: 30000, maxPayload: 1 << 24 };
  if (opts.url.startsWith('wss:')) {
    Object.assign(o, tlsClientOptions(opts.ca, opts.servername));
  }
  return o;
}

/** Open one connection; resolves with the socket once the handshake is done. */
function openOne(url, options, handlers) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, options);
    let opened = false;
    ws.on('message', (data) => handlers.message(ws, data));
    ws.once('open', () => {
      opened = true;
      resolve(ws);
    });
    ws.on('error', (err) => {
      if (!opened) reject(err);
    });
    ws.on('close', (code) => {
      if (!opened) reject(new Error(`closed (${code}) before the handshake completed`));
      else handlers.close(ws, code);
    });
  });
}

function onStdin(handler) {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => handler(line.trim()));
  rl.on('close', () => handler('EOF'));
}

// ---------------------------------------------------------------------------------------------------------

async function receiver(opts) {
  const n = opts.connections;
  const sockets = new Array(n);
  const index = new Map(); // socket -> connection number
  const firstAt = new Float64Array(n);
  const frames = new Uint32Array(n);
  const ids = {};
  let received = 0;
  let duplicates = 0;
  let other = 0;
  let unparsable = 0;
  let closedEarly = 0;
  const closeCodes = {};
  let closing = false;
  let reported = false;
  let goAt = null;
  let timer = null;

  function finish(reason) {
    if (reported) return;
    reported = true;
    if (timer) clearTimeout(timer);
    const times = [];
    let first = null;
    let last = null;
    for (let i = 0; i < n; i++) {
      if (frames[i] === 0) continue;
      const t = firstAt[i];
      times.push(round3(t));
      if (first === null || t < first) first = t;
      if (last === null || t > last) last = t;
    }
    times.sort((a, b) => a - b);
    emit({
      event: 'report', role: 'receiver', pid: process.pid, reason, connections: n, received,
      missing: n - received, duplicates, other_frames: other, unparsable, closed_early: closedEarly,
      close_codes: closeCodes, broadcast_ids: ids, go_ms: goAt === null ? null : round3(goAt),
      first_ms: first === null ? null : round3(first), last_ms: last === null ? null : round3(last), times,
    });
    // keep the connections until told (stdin closes / SIGTERM), bounded by --linger
    setTimeout(() => shutdown(0), opts.linger * 1000).unref();
  }

  function shutdown(code) {
    if (closing) return;
    closing = true;
    if (!reported) finish('shutdown');
    for (const ws of sockets) if (ws) ws.terminate();
    process.stdout.write('', () => process.exit(code));
  }

  const handlers = {
    message(ws, data) {
      const i = index.get(ws);
      let msg;
      try {
        msg = JSON.parse(data);
      } catch {
        unparsable++;
        return;
      }
      if (msg === null || msg.op !== 'broadcast') {
        other++;
        return;
      }
      const t = nowMs();
      ids[msg.broadcast] = (ids[msg.broadcast] || 0) + 1;
      if (frames[i] === 0) {
        firstAt[i] = t;
        received++;
      } else {
        duplicates++;
      }
      frames[i]++;
      if (received === n && !reported) setImmediate(() => finish('all received'));
    },
    close(ws, code) {
      if (closing) return;
      closedEarly++;
      closeCodes[code] = (closeCodes[code] || 0) + 1;
    },
  };

  onStdin((cmd) => {
    if (cmd === 'go' && goAt === null) {
      goAt = nowMs();
      if (!reported) timer = setTimeout(() => finish('timeout'), opts.timeout * 1000);
    } else if (cmd === 'report') {
      finish('told');
    } else if (cmd === 'EOF' || cmd === 'exit') {
      shutdown(0);
    }
  });
  process.on('SIGTERM', () => shutdown(0));
  process.on('SIGINT', () => shutdown(0));

  // open phase
  const options = wsOptions(opts);
  const deadline = Date.now() + opts.connectTimeout * 1000;
  const start = nowMs();
  let next = 0;
  let retries = 0;
  const runner = async () => {
    while (next < n && !closing) {
      const i = next++;
      for (let attempt = 1; ; attempt++) {
        if (Date.now() > deadline) throw new Error(`open phase exceeded ${opts.connectTimeout}s`);
        try {
          const ws = await openOne(opts.url, options, handlers);
          sockets[i] = ws;
          index.set(ws, i);
          break;
        } catch (err) {
          if (attempt >= 5) throw new Error(`connection ${i}: ${err.message} (after ${attempt} tries)`);
          retries++;
          await sleep(100 * attempt);
        }
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(n, opts.concurrency) }, runner));
  } catch (err) {
    emit({ event: 'error', role: 'receiver', pid: process.pid, error: err.message }, () => process.exit(1));
    closing = true;
    for (const ws of sockets) if (ws) ws.terminate();
    return;
  }
  const end = nowMs();
  emit({
    event: 'ready', role: 'receiver', pid: process.pid, connections: n, retries, open_ms: round3(end - start),
    connections_per_s: Math.round((n * 1000) / Math.max(1, end - start)),
  });
}

// ---------------------------------------------------------------------------------------------------------

async function pinger(opts) {
  const samples = []; // [sent_ms, rtt_ms, late_ms]
  const outstanding = new Map(); // id -> [sent_ms, late_ms]
  let closedCode = null;
  let broadcastAt = null;
  let other = 0;
  let nextId = 0;
  let nextAt = 0;
  let timer = null;
  let stopping = false;
  let stoppedAt = null;
  let startedAt = 0;
  let ws;
  try {
    ws = await openOne(opts.url, wsOptions(opts), {
      message: (_, data) => onMessage(data),
      close: (_, code) => {
        closedCode = code;
      },
    });
  } catch (err) {
    emit({ event: 'error', role: 'pinger', error: err.message }, () => process.exit(1));
    return;
  }
  nextAt = nowMs();
  startedAt = nextAt;

  function onMessage(data) {
    const t = nowMs();
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      other++;
      return;
    }
    if (msg && msg.op === 'pong' && outstanding.has(msg.id)) {
      const [sent, late] = outstanding.get(msg.id);
      outstanding.delete(msg.id);
      samples.push([round3(sent), round3(t - sent), round3(late)]);
      if (stopping && outstanding.size === 0) report();
    } else if (msg && msg.op === 'broadcast') {
      if (broadcastAt === null) broadcastAt = t;
    } else {
      other++;
    }
  }

  function tick() {
    if (stopping) return;
    const t = nowMs();
    const id = ++nextId;
    outstanding.set(id, [t, t - nextAt]);
    if (ws.readyState === WebSocket.OPEN) ws.send(`{"op":"ping","id":${id}}`);
    nextAt += opts.intervalMs;
    if (nextAt < t) nextAt = t + opts.intervalMs; // late: skip ahead rather than burst
    timer = setTimeout(tick, Math.max(0, nextAt - nowMs()));
  }

  let reported = false;
  function report() {
    if (reported) return;
    reported = true;
    emit({
      event: 'report', role: 'pinger', pid: process.pid, interval_ms: opts.intervalMs, started_ms: round3(startedAt),
      stopped_ms: stoppedAt === null ? null : round3(stoppedAt), sent: nextId, answered: samples.length,
      samples, unanswered: [...outstanding.values()].map(([sent]) => round3(sent)),
      broadcast_ms: broadcastAt === null ? null : round3(broadcastAt), other_frames: other, closed_code: closedCode,
    }, () => {
      ws.terminate();
      process.exit(0);
    });
  }

  function stop() {
    if (stopping) return;
    stopping = true;
    stoppedAt = nowMs();
    if (timer) clearTimeout(timer);
    if (outstanding.size === 0) report();
    else setTimeout(report, opts.graceMs);
  }

  onStdin((cmd) => {
    if (cmd === 'stop' || cmd === 'EOF') stop();
  });
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  setTimeout(stop, opts.maxSeconds * 1000).unref();
  emit({ event: 'ready', role: 'pinger', pid: process.pid });
  tick();
}

const opts = parseArgs(process.argv.slice(2));
(opts.role === 'receiver' ? receiver(opts) : pinger(opts)).catch((err) => {
  process.stderr.write(`broadcast.js: ${err.stack || err}\n`);
  process.exit(1);
});
