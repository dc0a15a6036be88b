#!/usr/bin/env node
// Load generator for pushd (see bench/README.md). One invocation = one scenario = ONE JSON line on stdout.
//
//   node loadgen.js --mode throughput|latency|idle --url wss://127.0.0.1:PORT/ws --redis redis://127.0.0.1:PORT
//       [--connections N] [--topics T] [--concurrency C] [--procs K] [--warmup S] [--duration S]
//       [--window W] [--rate R] [--payload-bytes B] [--ca FILE] [--servername NAME]
//       [--centrifugo-percent P] [--centrifugo-path PATH]
//
// Clients speak pushd's own protocol at --url, or (--centrifugo-percent P: P% of every topic's subscribers)
// Centrifugo's client protocol v2 (JSON) at --centrifugo-path on the same host and port: a connect command
// once the WebSocket is open, a subscribe command per connection, and `{}` back for every server ping `{}`.
// Latency and losses are reported per protocol as well as in total.
//
// Modes:
//   throughput  T must be 1. Closed loop: at most W messages in flight, where a message is done once ALL N
//               subscribers have it. Reports deliveries/s counted at the clients over the measurement window
//               (after the warm-up), and checks that every client got every message exactly once, in order.
//   latency     Publishes at a fixed rate (--rate per second, round-robin over the T topics) with the send time
//               in the payload; records publish-to-receive latency of every delivery in the window.
//   idle        Opens and subscribes N connections, prints the result line (connection rates), then holds the
//               connections until stdin closes or SIGTERM/SIGINT arrives.
//
// With --procs K > 1 the connections are spread over K forked worker processes (N/K each); this process then
// only publishes and aggregates. Workers report over the IPC channel. Timestamps are CLOCK_MONOTONIC
// (process.hrtime), which every process on the machine shares, so latency is comparable across processes.
//
// Progress goes to stderr as lines starting with "@@ " followed by JSON ({"event": ...}), so an orchestrator
// can follow the phases (it samples pushd's CPU time at window_start/window_end).
'use strict';

const { parseOptions, tlsClientOptions } = require('./common');
const { fork } = require('node:child_process');
const { performance } = require('node:perf_hooks');

const WebSocket = require('ws');

// ---------------------------------------------------------------------------------------------------------
// options

const DEFAULTS = {
  mode: 'throughput',
  url: 'wss://127.0.0.1:8443/ws',
  redis: 'redis://127.0.0.1:6379',
  channelPrefix: 'push:',
  connections: 1000,
  topics: 1,
  concurrency: 32, // pushd listens with Twisted's default backlog of 50
  procs: 1,
  warmup: 2,
  duration: 10,
  window: 32,
  rate: 1000,
  payloadBytes: 64,
  ca: '',
  servername: 'localhost',
  connectTimeout: 180, // seconds for the whole open phase
  subscribeTimeout: 60, // seconds for the whole subscribe phase
  drainTimeout: 20, // seconds to wait for the last messages after publishing stops
  stallTimeout: 10, // throughput: seconds without progress before giving up
  role: 'main',
  offset: 0,
  patterns: 0, // 1: topics are t<j>.q and every connection subscribes to the pattern t<j>.* instead
  centrifugoPercent: 0, // share of each topic's subscribers that speak Centrifugo's protocol
  centrifugoPath: '/connection/websocket',
};

function parseArgs(argv) {
  const opts = parseOptions(DEFAULTS, argv);
  if (!['throughput', 'latency', 'idle'].includes(opts.mode)) throw new Error(`unknown --mode ${opts.mode}`);
  if (opts.mode === 'throughput' && opts.topics !== 1) throw new Error('throughput mode uses exactly 1 topic');
  if (opts.connections < 1 || opts.topics < 1 || opts.procs < 1) throw new Error('connections/topics/procs >= 1');
  if (opts.connections < opts.topics) throw new Error('need at least one connection per topic');
  if (!(opts.centrifugoPercent >= 0 && opts.centrifugoPercent <= 100)) throw new Error('--centrifugo-percent 0..100');
  PATTERNS = opts.patterns === 1;
  return opts;
}

// ---------------------------------------------------------------------------------------------------------
// helpers

/** CLOCK_MONOTONIC in microseconds; shared by all processes on the machine. */
function nowUs() {
  return Number(process.hrtime.bigint() / 1000n);
}

function event(name, fields = {}) {
  process.stderr.write(`@@ ${JSON.stringify({ event: name, pid: process.pid, t: nowUs(), ...fields })}\n`);
}

let PATTERNS = false;

function topicName(j) {
  return PATTERNS ? `t${j}.q` : `t${j}`;
}

/** What a connection subscribes to for topic j: the topic itself, or (--patterns 1) a pattern matching only it. */
function subscriptionName(j) {
  return PATTERNS ? `t${j}.*` : topicName(j);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Parse the decimal integer starting at buf[pos]; -1 if there is none. */
function intAt(buf, pos) {
  let value = 0;
  let c = buf[pos];
  if (c === undefined || c < 48 || c > 57) return -1;
  while (c >= 48 && c <= 57) {
    value = value * 10 + (c - 48);
    c = buf[++pos];
  }
  return value;
}

const S_KEY = Buffer.from('"s":');

// -- the two wire protocols ------------------------------------------------------------------------------

const PUSHD = 0;
const CENTRIFUGO = 1;
const WIRES = ['pushd', 'centrifugo'];
const CONNECT_ID = 1;
const SUBSCRIBE_ID = 2;
const CONNECT_FRAME = JSON.stringify({ id: CONNECT_ID, connect: {} });

/** Whether global connection `index` speaks Centrifugo's protocol: `percent`% of each topic's subscribers,
 * spread evenly over them (connection index = topic + k * topics, k-th subscriber of its topic). */
function wireOf(index, topics, percent) {
  const k = Math.floor(index / topics);
  return Math.floor(((k + 1) * percent) / 100) > Math.floor((k * percent) / 100) ? CENTRIFUGO : PUSHD;
}

/** The URL of Centrifugo's endpoint on the same host and port as pushd's own `url`. */
function centrifugoUrl(url, path) {
  const u = new URL(url);
  u.pathname = path;
  u.search = '';
  return u.toString();
}
const T_KEY = Buffer.from('"t":');

/** Latency histogram: 1 us buckets up to 1 s, then 1 ms buckets up to 120 s, then one overflow bucket. */
const FINE = 1_000_000;
const COARSE = 120_000;
class Histogram {
  constructor() {
    this.fine = new Uint32Array(FINE);
    this.coarse = new Uint32Array(COARSE + 1);
    this.count = 0;
    this.max = 0;
    this.sum = 0;
  }

  record(us) {
    if (us < 0) us = 0;
    if (us < FINE) this.fine[us]++;
    else this.coarse[Math.min(COARSE, Math.floor(us / 1000))]++;
    this.count++;
    this.sum += us;
    if (us > this.max) this.max = us;
  }

  toSparse() {
    const fine = [];
    const coarse = [];
    for (let i = 0; i < FINE; i++) if (this.fine[i]) fine.push(i, this.fine[i]);
    for (let i = 0; i <= COARSE; i++) if (this.coarse[i]) coarse.push(i, this.coarse[i]);
    return { fine, coarse, count: this.count, max: this.max, sum: this.sum };
  }

  merge(sparse) {
    for (let k = 0; k < sparse.fine.length; k += 2) this.fine[sparse.fine[k]] += sparse.fine[k + 1];
    for (let k = 0; k < sparse.coarse.length; k += 2) this.coarse[sparse.coarse[k]] += sparse.coarse[k + 1];
    this.count += sparse.count;
    this.sum += sparse.sum;
    if (sparse.max > this.max) this.max = sparse.max;
  }

  /** Value (us) at quantile q: the smallest bucket whose cumulative count reaches q * count. */
  quantile(q) {
    if (this.count === 0) return null;
    const target = Math.max(1, Math.ceil(q * this.count));
    let seen = 0;
    for (let i = 0; i < FINE; i++) {
      seen += this.fine[i];
      if (seen >= target) return i;
    }
    for (let i = 0; i <= COARSE; i++) {
      seen += this.coarse[i];
      if (seen >= target) return i * 1000;
    }
    return this.max;
  }

  summaryMs() {
    const ms = (us) => (us === null ? null : Math.round(us) / 1000);
    return {
      samples: this.count,
      mean_ms: this.count ? ms(this.sum / this.count) : null,
      p50_ms: ms(this.quantile(0.5)),
      p90_ms: ms(this.quantile(0.9)),
      p99_ms: ms(this.quantile(0.99)),
      p999_ms: ms(this.quantile(0.999)),
      max_ms: ms(this.count ? this.max : null),
    };
  }
}

function cpuSnapshot() {
  return { cpu: process.cpuUsage(), elu: performance.eventLoopUtilization(), t: nowUs() };
}

function cpuSince(snap) {
  const cpu = process.cpuUsage(snap.cpu);
  const elu = performance.eventLoopUtilization(snap.elu);
  const wall = Math.max(1, nowUs() - snap.t);
  return {
    cpu_pct: Math.round(((cpu.user + cpu.system) / wall) * 1000) / 10,
    event_loop_utilization: Math.round(elu.utilization * 1000) / 1000,
  };
}

// ---------------------------------------------------------------------------------------------------------
// the subscribers: a Fleet holds `count` connections, global indexes offset..offset+count-1

class Fleet {
  constructor(opts, offset, count, send) {
    this.opts = opts;
    this.offset = offset;
    this.count = count;
    this.send = send; // (message) => void, to the coordinator
    this.sockets = new Array(count);
    this.topicOf = new Uint32Array(count);
    this.next = new Float64Array(count); // next expected sequence number per connection
    this.received = new Float64Array(count); // data frames received per connection
    this.subscribedFlag = new Uint8Array(count);
    this.localPerTopic = new Uint32Array(opts.topics);
    this.wireOf = new Uint8Array(count);
    this.wireCount = [0, 0];
    for (let i = 0; i < count; i++) {
      const j = (offset + i) % opts.topics;
      this.topicOf[i] = j;
      this.localPerTopic[j]++;
      this.wireOf[i] = wireOf(offset + i, opts.topics, opts.centrifugoPercent);
      this.wireCount[this.wireOf[i]]++;
    }
    this.urls = [opts.url, centrifugoUrl(opts.url, opts.centrifugoPath)];
    // What starts a data frame's topic, per wire: {"topic":"t0",... and {"push":{"channel":"t0","pub":...
    this.topicTags = [
      Array.from({ length: opts.topics }, (_, j) => Buffer.from(`"topic":"${topicName(j)}",`)),
      Array.from({ length: opts.topics }, (_, j) => Buffer.from(`"channel":"${topicName(j)}","pub":`)),
    ];
    this.connectWaiters = new Map(); // connection -> resolve/reject of its Centrifugo connect command
    this.totalReceived = 0;
    this.outOfOrder = 0;
    this.wrongTopic = 0;
    this.unparsable = 0;
    this.subscribed = 0;
    this.subscribeErrors = [];
    this.openErrors = 0;
    this.openRetries = 0;
    this.closedEarly = 0;
    this.closeCodes = {};
    this.closing = false;
    // throughput bookkeeping: receipts per global sequence number (a ring), and the first not-done sequence
    this.ring = new Uint32Array(1 << 16);
    this.ringMask = (1 << 16) - 1;
    this.done = 0;
    this.progressScheduled = false;
    // latency bookkeeping
    this.hist = null; // latency: one Histogram per wire
    this.windowStart = Infinity;
    this.windowEnd = -Infinity;
    this.inWindow = 0;
    // window snapshots
    this.snapStart = null;
    this.snapEnd = null;
    this.onSubscribed = null;
    this.onDrained = null;
    this.expected = null;
  }

  // -- opening --------------------------------------------------------------------------------------------

  wsOptions() {
    const o = {
      perMessageDeflate: false,
      skipUTF8Validation: true,
      handshakeTimeout: 30000,
      maxPayload: 1 << 24,
    };
    if (this.opts.url.startsWith('wss:')) {
      Object.assign(o, tlsClientOptions(this.opts.ca, this.opts.servername));
    }
    return o;
  }

  openOne(i, wsOptions) {
    return new Promise((resolve, reject) => {
      const wire = this.wireOf[i];
      const ws = new WebSocket(this.urls[wire], wsOptions);
      let opened = false;
      ws.on('message', (data) => this.onMessage(i, data));
      ws.once('open', () => {
        opened = true;
        this.sockets[i] = ws;
        if (wire === PUSHD) {
          resolve();
          return;
        }
        // Centrifugo's protocol: the session opens with a connect command and its reply.
        const timer = setTimeout(() => fail(new Error('no connect reply within 30s')), 30000);
        const fail = (err) => {
          clearTimeout(timer);
          this.connectWaiters.delete(i);
          opened = false; // its close is not an early close of a running connection
          ws.terminate();
          reject(err);
        };
        this.connectWaiters.set(i, {
          resolve: () => {
            clearTimeout(timer);
            this.connectWaiters.delete(i);
            resolve();
          },
          reject: fail,
        });
        ws.send(CONNECT_FRAME);
      });
      ws.on('error', (err) => {
        if (!opened) reject(err);
      });
      ws.on('close', (code) => {
        if (!opened) {
          reject(new Error(`closed (${code}) before the handshake completed`));
        } else if (!this.closing) {
          this.closedEarly++;
          this.closeCodes[code] = (this.closeCodes[code] || 0) + 1;
          this.send({ type: 'closed', code });
        }
      });
    });
  }

  async open() {
    const wsOptions = this.wsOptions();
    const deadline = Date.now() + this.opts.connectTimeout * 1000;
    let nextIndex = 0;
    const concurrency = Math.max(1, Math.min(this.count, Math.ceil(this.opts.concurrency / this.opts.procs)));
    const runner = async () => {
      while (nextIndex < this.count) {
        const i = nextIndex++;
        for (let attempt = 1; ; attempt++) {
          if (Date.now() > deadline) throw new Error(`open phase exceeded ${this.opts.connectTimeout}s`);
          try {
            await this.openOne(i, wsOptions);
            break;
          } catch (err) {
            this.openErrors++;
            if (attempt >= 5) throw new Error(`connection ${this.offset + i}: ${err.message} (after ${attempt} tries)`);
            this.openRetries++;
            await sleep(100 * attempt);
          }
        }
      }
    };
    const start = nowUs();
    await Promise.all(Array.from({ length: concurrency }, runner));
    const end = nowUs();
    return { start, end };
  }

  subscribe() {
    const start = nowUs();
    const frames = [
      Array.from({ length: this.opts.topics }, (_, j) => JSON.stringify({ op: 'subscribe', topics: [subscriptionName(j)] })),
      Array.from({ length: this.opts.topics }, (_, j) =>
        JSON.stringify({ id: SUBSCRIBE_ID, subscribe: { channel: subscriptionName(j) } }),
      ),
    ];
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`only ${this.subscribed}/${this.count} subscribed after ${this.opts.subscribeTimeout}s`)),
        this.opts.subscribeTimeout * 1000,
      );
      this.onSubscribed = () => {
        clearTimeout(timer);
        resolve({ start, end: nowUs() });
      };
      for (let i = 0; i < this.count; i++) this.sockets[i].send(frames[this.wireOf[i]][this.topicOf[i]]);
    });
  }

  // -- receiving ------------------------------------------------------------------------------------------

  onMessage(i, data) {
    // pushd's data frames start with {"topic":, its replies with {"op":. Centrifugo's publications start with
    // {"push":, its replies with {"id":, and its pings are {}.
    const wire = this.wireOf[i];
    if (data[2] !== (wire === PUSHD ? 0x74 /* t */ : 0x70 /* p */)) {
      if (wire === PUSHD) this.onReply(i, data);
      else this.onCentrifugoReply(i, data);
      return;
    }
    const j = this.topicOf[i];
    if (data.indexOf(this.topicTags[wire][j]) < 0) {
      this.wrongTopic++;
      return;
    }
    const sPos = data.indexOf(S_KEY);
    const s = sPos < 0 ? -1 : intAt(data, sPos + 4);
    if (s < 0) {
      this.unparsable++;
      return;
    }
    this.received[i]++;
    this.totalReceived++;
    if (s === this.next[i]) {
      this.next[i] = s + 1;
    } else {
      this.outOfOrder++;
      if (s > this.next[i]) this.next[i] = s + 1;
    }
    if (this.hist !== null) {
      const tPos = data.indexOf(T_KEY, sPos);
      const sent = tPos < 0 ? -1 : intAt(data, tPos + 4);
      if (sent >= this.windowStart && sent < this.windowEnd) {
        this.hist[wire].record(nowUs() - sent);
        this.inWindow++;
      }
    } else {
      const ring = this.ring;
      ring[s & this.ringMask]++;
      if (s === this.done) this.advance();
    }
    if (this.onDrained !== null && this.totalReceived >= this.expectedTotal) this.checkDrained();
  }

  advance() {
    const ring = this.ring;
    const mask = this.ringMask;
    const count = this.count;
    let done = this.done;
    while (ring[done & mask] === count) {
      ring[done & mask] = 0;
      done++;
    }
    if (done !== this.done) {
      this.done = done;
      if (!this.progressScheduled) {
        this.progressScheduled = true;
        setImmediate(() => {
          this.progressScheduled = false;
          this.send({ type: 'progress', done: this.done });
        });
      }
    }
  }

  /** A reply's JSON, or undefined (counted as unparsable). */
  parseReply(data) {
    try {
      return JSON.parse(data.toString());
    } catch {
      this.unparsable++;
      return undefined;
    }
  }

  onReply(i, data) {
    const reply = this.parseReply(data);
    if (reply === undefined) return;
    if (reply.op === 'subscribed' && !this.subscribedFlag[i]) {
      this.subscribedFlag[i] = 1;
      this.subscribed++;
      if (this.subscribed === this.count && this.onSubscribed) this.onSubscribed();
    } else if (reply.op === 'error') {
      if (this.subscribeErrors.length < 5) this.subscribeErrors.push(reply);
    }
  }

  onCentrifugoReply(i, data) {
    if (data.length === 2) {
      this.sockets[i].send('{}'); // the server's ping: a pong is an empty command too
      return;
    }
    const reply = this.parseReply(data);
    if (reply === undefined) return;
    if (reply.id === CONNECT_ID) {
      const waiter = this.connectWaiters.get(i);
      if (waiter && reply.connect) waiter.resolve();
      else if (waiter) waiter.reject(new Error(`connect refused: ${JSON.stringify(reply.error)}`));
    } else if (reply.id === SUBSCRIBE_ID && reply.subscribe && !this.subscribedFlag[i]) {
      this.subscribedFlag[i] = 1;
      this.subscribed++;
      if (this.subscribed === this.count && this.onSubscribed) this.onSubscribed();
    } else if (reply.error) {
      if (this.subscribeErrors.length < 5) this.subscribeErrors.push(reply);
    }
  }

  // -- phases ---------------------------------------------------------------------------------------------

  startWindow(windowStart, windowEnd, latency) {
    if (latency) {
      this.hist = [new Histogram(), new Histogram()];
      this.windowStart = windowStart;
      this.windowEnd = windowEnd;
    }
    const at = (t, fn) => setTimeout(fn, Math.max(0, (t - nowUs()) / 1000));
    at(windowStart, () => {
      this.snapStart = { received: this.totalReceived, ...cpuSnapshot() };
    });
    at(windowEnd, () => {
      const snap = this.snapStart || { received: 0, ...cpuSnapshot() };
      this.snapEnd = {
        received: this.totalReceived - snap.received,
        seconds: (nowUs() - snap.t) / 1e6,
        ...cpuSince(snap),
      };
    });
  }

  /** Wait until every connection has `expected[topic]` messages (or the deadline), then report. */
  finish(expectedPerTopic, timeoutS) {
    this.expected = expectedPerTopic;
    let total = 0;
    for (let j = 0; j < this.opts.topics; j++) total += expectedPerTopic[j] * this.localPerTopic[j];
    this.expectedTotal = total;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.onDrained = null;
        resolve(this.report(true));
      }, timeoutS * 1000);
      this.onDrained = () => {
        clearTimeout(timer);
        this.onDrained = null;
        resolve(this.report(false));
      };
      this.checkDrained();
    });
  }

  checkDrained() {
    if (this.totalReceived >= this.expectedTotal && this.onDrained) this.onDrained();
  }

  report(timedOut) {
    let lost = 0;
    let duplicates = 0;
    let incomplete = 0;
    const lostByWire = [0, 0];
    for (let i = 0; i < this.count; i++) {
      const want = this.expected[this.topicOf[i]];
      const got = this.received[i];
      if (got < want) {
        lost += want - got;
        lostByWire[this.wireOf[i]] += want - got;
        incomplete++;
      } else if (got > want) {
        duplicates += got - want;
      }
    }
    return {
      connections: this.count,
      received: this.totalReceived,
      expected: this.expectedTotal,
      lost,
      duplicates,
      incomplete_connections: incomplete,
      out_of_order: this.outOfOrder,
      wrong_topic: this.wrongTopic,
      unparsable: this.unparsable,
      closed_early: this.closedEarly,
      close_codes: this.closeCodes,
      drain_timed_out: timedOut,
      window: this.snapEnd,
      in_window: this.inWindow,
      connections_by_wire: this.wireCount,
      lost_by_wire: lostByWire,
      hist: this.hist ? this.hist.map((h) => h.toSparse()) : null,
    };
  }

  close() {
    this.closing = true;
    for (const ws of this.sockets) if (ws) ws.terminate();
  }
}

// ---------------------------------------------------------------------------------------------------------
// worker side: a Fleet driven over the IPC channel (or directly, in-process, when --procs 1)

function runWorker(opts) {
  const send = (m) => process.send(m);
  const fleet = new Fleet(opts, opts.offset, opts.connections, send);
  process.on('disconnect', () => {
    fleet.close();
    process.exit(0);
  });
  process.on('message', async (m) => {
    try {
      if (m.type === 'open') {
        const open = await fleet.open();
        send({ type: 'opened', open, retries: fleet.openRetries });
      } else if (m.type === 'subscribe') {
        const sub = await fleet.subscribe();
        send({ type: 'subscribed', sub, errors: fleet.subscribeErrors });
      } else if (m.type === 'start') {
        fleet.startWindow(m.windowStart, m.windowEnd, m.latency);
      } else if (m.type === 'finish') {
        send({ type: 'report', report: await fleet.finish(m.expected, m.timeout) });
      } else if (m.type === 'exit') {
        fleet.close();
        setImmediate(() => process.exit(0));
      }
    } catch (err) {
      send({ type: 'fatal', message: err.message });
    }
  });
  send({ type: 'hello' });
}

/** The coordinator's handle on one Fleet: in-process or a forked worker; same messages either way. */
class WorkerHandle {
  constructor(opts, offset, count, index, onMessage) {
    this.index = index;
    this.onMessage = onMessage;
    this.pending = new Map(); // reply type -> {resolve, reject}
    this.child = null;
    this.fleet = null;
    if (opts.procs === 1) {
      this.fleet = new Fleet(opts, offset, count, (m) => this.dispatch(m));
      this.ready = Promise.resolve();
    } else {
      const args = [];
      for (const [k, v] of Object.entries({ ...opts, role: 'worker', offset, connections: count })) {
        args.push(`--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`, String(v));
      }
      this.child = fork(__filename, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      this.exited = false;
      this.child.on('message', (m) => this.dispatch(m));
      this.child.on('exit', (code, signal) => {
        this.exited = true;
        if (!this.stopping) this.failAll(new Error(`worker ${index} exited (${code ?? signal})`));
      });
      this.ready = this.request(null, 'hello');
    }
  }

  dispatch(m) {
    const waiter = this.pending.get(m.type);
    if (m.type === 'fatal') {
      this.failAll(new Error(`worker ${this.index}: ${m.message}`));
    } else if (waiter) {
      this.pending.delete(m.type);
      waiter.resolve(m);
    } else {
      this.onMessage(this, m);
    }
  }

  failAll(err) {
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
    this.onMessage(this, { type: 'fatal', message: err.message });
  }

  /** Send `message` (if any) and wait for the reply of type `replyType`. */
  request(message, replyType) {
    const reply = new Promise((resolve, reject) => this.pending.set(replyType, { resolve, reject }));
    if (message) this.post(message);
    return reply;
  }

  post(m) {
    if (this.child) {
      if (!this.exited) this.child.send(m);
      return;
    }
    // in-process: same protocol as runWorker, without serialisation
    const fleet = this.fleet;
    const fail = (err) => this.dispatch({ type: 'fatal', message: err.message });
    if (m.type === 'open') {
      fleet.open().then((open) => this.dispatch({ type: 'opened', open, retries: fleet.openRetries }), fail);
    } else if (m.type === 'subscribe') {
      fleet.subscribe().then((sub) => this.dispatch({ type: 'subscribed', sub, errors: fleet.subscribeErrors }), fail);
    } else if (m.type === 'start') {
      fleet.startWindow(m.windowStart, m.windowEnd, m.latency);
    } else if (m.type === 'finish') {
      fleet.finish(m.expected, m.timeout).then((report) => this.dispatch({ type: 'report', report }), fail);
    } else if (m.type === 'exit') {
      fleet.close();
    }
  }

  stop() {
    this.stopping = true;
    if (this.child) {
      if (!this.exited) {
        try {
          this.child.send({ type: 'exit' });
        } catch {
          /* already gone */
        }
        const child = this.child;
        setTimeout(() => {
          if (!this.exited) child.kill('SIGKILL');
        }, 3000).unref();
      }
    } else if (this.fleet) {
      this.fleet.close();
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// coordinator

async function main(opts) {
  const Redis = require('ioredis');
  const started = nowUs();
  const result = {
    mode: opts.mode,
    url: opts.url,
    connections: opts.connections,
    topics: opts.topics,
    procs: opts.procs,
    concurrency: opts.concurrency,
    payload_bytes: opts.payloadBytes,
    centrifugo_percent: opts.centrifugoPercent,
    ok: false,
  };
  let fatal = null;
  let abort = () => {};
  const onWorkerMessage = (handle, m) => {
    if (m.type === 'progress') {
      handle.done = m.done;
      onProgress();
    } else if (m.type === 'closed') {
      closedEarly++;
      if (opts.mode !== 'idle') abort(new Error(`server closed a subscriber connection (code ${m.code})`));
    } else if (m.type === 'fatal') {
      abort(new Error(m.message));
    }
  };
  let closedEarly = 0;
  let onProgress = () => {};

  const workers = [];
  let redis = null;
  const cleanup = () => {
    for (const w of workers) w.stop();
    if (redis) redis.disconnect();
  };
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => {
      if (opts.mode !== 'idle' || !holding) {
        cleanup();
        process.exit(130);
      }
    });
  }
  let holding = false;

  try {
    const aborted = new Promise((_, reject) => {
      abort = (err) => {
        if (!fatal) fatal = err;
        reject(err);
      };
    });
    aborted.catch(() => {});
    const guard = (p) => Promise.race([p, aborted]);

    // redis first: a wrong address should fail before 10,000 handshakes
    if (opts.mode !== 'idle') {
      redis = new Redis(opts.redis, { enableAutoPipelining: true, maxRetriesPerRequest: 1, lazyConnect: true });
      redis.on('error', () => {});
      await guard(redis.connect());
    }

    const per = Math.floor(opts.connections / opts.procs);
    let offset = 0;
    for (let k = 0; k < opts.procs; k++) {
      const count = k === opts.procs - 1 ? opts.connections - offset : per;
      workers.push(new WorkerHandle(opts, offset, count, k, onWorkerMessage));
      offset += count;
    }
    await guard(Promise.all(workers.map((w) => w.ready)));

    // open
    event('opening', { connections: opts.connections });
    // first start to last end of one phase over all workers, in µs
    const span = (msgs, key) => ({
      start: Math.min(...msgs.map((m) => m[key].start)),
      end: Math.max(...msgs.map((m) => m[key].end)),
    });
    const opened = await guard(Promise.all(workers.map((w) => w.request({ type: 'open' }, 'opened'))));
    const open = span(opened, 'open');
    result.open_seconds = (open.end - open.start) / 1e6;
    result.connections_per_s = Math.round(opts.connections / result.open_seconds);
    result.open_retries = opened.reduce((a, m) => a + m.retries, 0);
    event('opened', { seconds: result.open_seconds });

    // subscribe
    const subs = await guard(Promise.all(workers.map((w) => w.request({ type: 'subscribe' }, 'subscribed'))));
    const sub = span(subs, 'sub');
    result.subscribe_seconds = (sub.end - sub.start) / 1e6;
    result.subscribes_per_s = Math.round(opts.connections / result.subscribe_seconds);
    result.setup_seconds = (sub.end - started) / 1e6;
    event('subscribed', { seconds: result.subscribe_seconds });

    if (opts.mode === 'idle') {
      result.ok = true;
      process.stdout.write(`${JSON.stringify(result)}\n`);
      holding = true;
      event('holding');
      await guard(
        new Promise((resolve) => {
          process.stdin.on('end', resolve);
          process.stdin.on('close', resolve);
          process.stdin.on('error', resolve);
          process.stdin.resume();
          process.on('SIGTERM', resolve);
          process.on('SIGINT', resolve);
        }),
      );
      result.closed_early = closedEarly;
      event('released', { closed_early: closedEarly });
      return null; // the result line was printed already
    }

    const payloadPad = (fixed) => 'x'.repeat(Math.max(0, opts.payloadBytes - fixed));
    const t0 = nowUs() + 100_000; // let the start message reach every worker first
    const windowStart = t0 + opts.warmup * 1e6;
    const windowEnd = windowStart + opts.duration * 1e6;
    const latency = opts.mode === 'latency';
    for (const w of workers) w.post({ type: 'start', windowStart, windowEnd, latency });
    setTimeout(() => event('window_start'), Math.max(0, (windowStart - nowUs()) / 1000));
    setTimeout(() => event('window_end'), Math.max(0, (windowEnd - nowUs()) / 1000));
    let mainCpu = null;
    setTimeout(() => (mainCpu = cpuSnapshot()), Math.max(0, (windowStart - nowUs()) / 1000));
    let mainCpuWindow = null;
    setTimeout(() => (mainCpuWindow = mainCpu && cpuSince(mainCpu)), Math.max(0, (windowEnd - nowUs()) / 1000));

    const channels = Array.from({ length: opts.topics }, (_, j) => opts.channelPrefix + topicName(j));
    const published = new Array(opts.topics).fill(0);
    let publishErrors = 0;
    const onPublishError = () => {
      publishErrors++;
    };

    await guard(sleep(Math.max(0, (t0 - nowUs()) / 1000)));

    if (opts.mode === 'throughput') {
      // Closed loop: publish while fewer than `window` messages are not yet at every subscriber.
      const pad = payloadPad(20);
      let publishing = true;
      let total = 0;
      let doneAtStart = null;
      let doneAtEnd = null;
      let lastProgress = nowUs();
      const minDone = () => {
        let d = Infinity;
        for (const w of workers) d = Math.min(d, w.done || 0);
        return d;
      };
      let drained = null;
      onProgress = () => {
        lastProgress = nowUs();
        const done = minDone();
        while (publishing && total - done < opts.window) {
          redis.publish(channels[0], `{"s":${total},"p":"${pad}"}`).catch(onPublishError);
          total++;
        }
        if (!publishing && done >= total && drained) drained();
      };
      const stall = setInterval(() => {
        if (nowUs() - lastProgress > opts.stallTimeout * 1e6) {
          abort(new Error(`no message completed for ${opts.stallTimeout}s (published ${total}, done ${minDone()})`));
        }
      }, 500);
      try {
        onProgress();
        await guard(sleep((windowStart - nowUs()) / 1000));
        doneAtStart = { done: minDone(), t: nowUs() };
        await guard(sleep((windowEnd - nowUs()) / 1000));
        doneAtEnd = { done: minDone(), t: nowUs() };
        publishing = false;
        if (minDone() < total) {
          await guard(new Promise((resolve) => (drained = resolve)));
        }
      } finally {
        clearInterval(stall);
      }
      published[0] = total;
      result.window_size = opts.window;
      result.published = total;
      result.messages_per_s = Math.round(
        (doneAtEnd.done - doneAtStart.done) / ((doneAtEnd.t - doneAtStart.t) / 1e6),
      );
    } else {
      // Open loop at a fixed rate: the k-th message is due at t0 + k/rate; a timer catches up on what is due.
      const pad = payloadPad(40);
      const total = Math.round(opts.rate * (opts.warmup + opts.duration));
      const interval = 1e6 / opts.rate;
      let sent = 0;
      let maxLagUs = 0;
      await guard(
        new Promise((resolve) => {
          const tick = () => {
            const now = nowUs();
            const due = Math.min(total, Math.floor((now - t0) / interval) + 1);
            if (due > sent + 1) maxLagUs = Math.max(maxLagUs, now - (t0 + (sent + 1) * interval));
            while (sent < due) {
              const j = sent % opts.topics;
              const s = published[j]++;
              redis.publish(channels[j], `{"s":${s},"t":${nowUs()},"p":"${pad}"}`).catch(onPublishError);
              sent++;
            }
            if (sent < total) setTimeout(tick, Math.max(0, Math.min(1, (t0 + sent * interval - nowUs()) / 1000)));
            else resolve();
          };
          tick();
        }),
      );
      result.rate = opts.rate;
      result.published = sent;
      result.pacing_max_lag_ms = Math.round(maxLagUs) / 1000;
    }
    result.publish_errors = publishErrors;
    result.warmup_s = opts.warmup;
    result.duration_s = opts.duration;

    // collect: every worker waits for its last messages, then reports
    const reports = (
      await guard(
        Promise.all(
          workers.map((w) =>
            w.request({ type: 'finish', expected: published, timeout: opts.drainTimeout }, 'report'),
          ),
        ),
      )
    ).map((m) => m.report);
    const sum = (key) => reports.reduce((a, r) => a + r[key], 0);
    const windows = reports.map((r) => r.window).filter(Boolean);
    result.connections_by_protocol = {};
    result.lost_by_protocol = {};
    WIRES.forEach((name, wire) => {
      const connections = reports.reduce((a, r) => a + r.connections_by_wire[wire], 0);
      if (connections) {
        result.connections_by_protocol[name] = connections;
        result.lost_by_protocol[name] = reports.reduce((a, r) => a + r.lost_by_wire[wire], 0);
      }
    });
    result.deliveries = sum('received');
    result.expected_deliveries = sum('expected');
    result.lost = sum('lost');
    result.duplicates = sum('duplicates');
    result.out_of_order = sum('out_of_order');
    result.wrong_topic = sum('wrong_topic');
    result.unparsable = sum('unparsable');
    result.incomplete_connections = sum('incomplete_connections');
    result.closed_early = sum('closed_early');
    result.drain_timed_out = reports.some((r) => r.drain_timed_out);
    result.window_deliveries = windows.reduce((a, w) => a + w.received, 0);
    result.window_seconds = windows.length ? Math.max(...windows.map((w) => w.seconds)) : null;
    result.deliveries_per_s = windows.reduce((a, w) => a + w.received / w.seconds, 0);
    result.deliveries_per_s = Math.round(result.deliveries_per_s);
    result.loadgen_cpu = {
      coordinator: opts.procs > 1 ? mainCpuWindow : undefined,
      workers: windows.map((w) => ({ cpu_pct: w.cpu_pct, event_loop_utilization: w.event_loop_utilization })),
    };
    if (opts.procs === 1) result.loadgen_cpu = { process: windows[0] && result.loadgen_cpu.workers[0] };
    if (opts.mode === 'latency') {
      const hist = new Histogram();
      const byWire = [new Histogram(), new Histogram()];
      for (const r of reports) {
        if (!r.hist) continue;
        r.hist.forEach((sparse, wire) => {
          hist.merge(sparse);
          byWire[wire].merge(sparse);
        });
      }
      result.latency = hist.summaryMs();
      result.latency_by_protocol = {};
      WIRES.forEach((name, wire) => {
        if (result.connections_by_protocol[name]) result.latency_by_protocol[name] = byWire[wire].summaryMs();
      });
      result.expected_window_samples = null; // filled by the orchestrator if wanted
    }
    // ok: the run itself is sound (nothing duplicated, reordered, garbled or cut off). Messages still missing
    // after the drain period are `lost`: a finding the orchestrator compares with the target, not an error.
    result.integrity_ok =
      result.duplicates === 0 &&
      result.out_of_order === 0 &&
      result.wrong_topic === 0 &&
      result.unparsable === 0 &&
      result.closed_early === 0 &&
      result.publish_errors === 0;
    result.ok = result.integrity_ok;
    if (!result.ok) result.error = 'integrity check failed (duplicates/out_of_order/wrong_topic/closed_early)';
    return result;
  } catch (err) {
    result.ok = false;
    result.error = (fatal || err).message;
    return result;
  } finally {
    cleanup();
  }
}

// ---------------------------------------------------------------------------------------------------------

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`loadgen: ${err.message}\n`);
  process.exit(2);
}
if (opts.role === 'worker') {
  runWorker(opts);
} else {
  main(opts).then(
    (result) => {
      if (result) process.stdout.write(`${JSON.stringify(result)}\n`);
      setImmediate(() => process.exit(result === null || result.ok ? 0 : 1));
    },
    (err) => {
      process.stdout.write(`${JSON.stringify({ mode: opts.mode, ok: false, error: err.message })}\n`);
      process.exit(1);
    },
  );
}
