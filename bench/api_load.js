#!/usr/bin/env node
// Helper of bench/api_publish.py (see bench/README.md, "Broadcast and publish API benchmarks"): POST
// /api/publish in a closed loop and print ONE JSON line on stdout.
//
//   node api_load.js --api http://127.0.0.1:PORT --mode single|batch [--seconds 10] [--warmup 1]
//       [--concurrency 32] [--batch 100] [--ws wss://127.0.0.1:PORT/ws --ca FILE]
//
// Node's http with one keep-alive Agent (maxSockets = --concurrency) and --concurrency requests in flight.
// single: {"topic":"t1","data":{"n":i}}; batch: {"messages":[...--batch messages over the 10 topics t0..t9]}.
// Requests that complete in the --seconds after the --warmup count: requests/s, messages/s (messages of the
// 200 replies), every status other than 200 (and transport errors, as "error:<code>"), latency p50/p90/p99/max.
// With --ws, one wss connection subscribed to t1 counts the messages it gets, to check they are delivered:
// after the load it waits up to --drain seconds for as many as the 200 replies published to t1.
// Progress goes to stderr as "@@ {json}" lines (window_start, window_end), for the orchestrator's CPU samples.
'use strict';

const { parseOptions, tlsClientOptions } = require('./common');
const http = require('node:http');

const WebSocket = require('ws');

const DEFAULTS = {
  api: 'http://127.0.0.1:8080',
  mode: 'single',
  seconds: 10,
  warmup: 1,
  concurrency: 32,
  batch: 100,
  topics: 10,
  ws: '',
  ca: '',
  servername: 'localhost',
  drain: 10,
  requestTimeout: 30,
};

function parseArgs(argv) {
  const opts = parseOptions(DEFAULTS, argv);
  if (!['single', 'batch'].includes(opts.mode)) throw new Error(`unknown --mode ${opts.mode}`);
  if (opts.concurrency < 1 || opts.batch < 1 || opts.seconds <= 0 || opts.topics < 2) throw new Error('bad numbers');
  return opts;
}

/** CLOCK_MONOTONIC in milliseconds, microsecond resolution. */
function nowMs() {
  return Number(process.hrtime.bigint() / 1000n) / 1000;
}

function event(name, fields = {}) {
  process.stderr.write(`@@ ${JSON.stringify({ event: name, pid: process.pid, t_ms: nowMs(), ...fields })}\n`);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  return Math.round(sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] * 1000) / 1000;
}

// ---------------------------------------------------------------------------------------------------------
// the subscriber

function subscribe(opts) {
  const state = { received: 0, other: 0, closed: null, errors: [] };
  if (!opts.ws) return Promise.resolve(null);
  const o = { perMessageDeflate: false, handshakeTimeout: 30000, maxPayload: 1 << 24 };
  if (opts.ws.startsWith('wss:')) Object.assign(o, tlsClientOptions(opts.ca, opts.servername));
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(opts.ws, o);
    state.ws = ws;
    const timer = setTimeout(() => reject(new Error('subscriber: no "subscribed" within 30 s')), 30000);
    ws.on('open', () => ws.send('{"op":"subscribe","topics":["t1"],"id":1}'));
    ws.on('message', (data) => {
      // data frames start with {"topic":
      if (data[2] === 0x74 /* t */) {
        if (data.indexOf('"topic":"t1"') >= 0) state.received++;
        else state.other++;
        return;
      }
      const msg = JSON.parse(data);
      if (msg.op === 'subscribed') {
        clearTimeout(timer);
        resolve(state);
      } else if (msg.op === 'error') {
        state.errors.push(msg);
        clearTimeout(timer);
        reject(new Error(`subscriber: ${JSON.stringify(msg)}`));
      } else {
        state.other++;
      }
    });
    ws.on('error', (err) => {
      state.errors.push(String(err.message || err));
      clearTimeout(timer);
      reject(err);
    });
    ws.on('close', (code) => {
      state.closed = code;
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// the load

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const limit = opts.warmup + opts.seconds + opts.drain + opts.requestTimeout + 60;
  setTimeout(() => {
    process.stderr.write(`api_load.js: hard time limit (${limit} s) reached\n`);
    process.exit(2);
  }, limit * 1000).unref();
  const api = new URL(opts.api);
  const agent = new http.Agent({ keepAlive: true, maxSockets: opts.concurrency });

  // The batch body is the same for every request (building it is then no work for the client); t1 gets
  // every opts.topics-th message of it.
  let batchBody = null;
  let t1PerRequest = 1;
  if (opts.mode === 'batch') {
    const messages = [];
    for (let k = 0; k < opts.batch; k++) messages.push({ topic: `t${k % opts.topics}`, data: { n: k } });
    batchBody = Buffer.from(JSON.stringify({ messages }));
    t1PerRequest = messages.filter((m) => m.topic === 't1').length;
  }
  const perRequest = opts.mode === 'batch' ? opts.batch : 1;

  const sub = await subscribe(opts);

  const latencies = [];
  const status = {};
  let errorSample = null;
  let inWindow = 0;
  let okInWindow = 0;
  let okTotal = 0;
  let sentTotal = 0;
  let n = 0;
  const start = nowMs();
  const windowStart = start + opts.warmup * 1000;
  const windowEnd = windowStart + opts.seconds * 1000;
  let windowStarted = false;

  function once() {
    const i = n++;
    const body = batchBody || Buffer.from(`{"topic":"t1","data":{"n":${i}}}`);
    return new Promise((resolve) => {
      const sent = nowMs();
      sentTotal++;
      let settled = false;
      const done = (code, text) => {
        if (settled) return;
        settled = true;
        const t = nowMs();
        if (code === 200) okTotal++;
        if (t >= windowStart && t < windowEnd) {
          inWindow++;
          status[code] = (status[code] || 0) + 1;
          latencies.push(t - sent);
          if (code === 200) okInWindow++;
        } else if (code !== 200) {
          status[code] = (status[code] || 0) + 1; // a failure counts whenever it happens
        }
        if (code !== 200 && errorSample === null) errorSample = { code, body: String(text).slice(0, 500) };
        resolve();
      };
      const req = http.request({
        agent, host: api.hostname, port: api.port, method: 'POST', path: '/api/publish',
        headers: { 'Content-Type': 'application/json', 'Content-Length': body.length },
      }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => done(res.statusCode, res.statusCode === 200 ? '' : Buffer.concat(chunks).toString()));
        res.on('error', (err) => done(`error:${err.code || err.message}`, err.message));
      });
      req.setTimeout(opts.requestTimeout * 1000, () => req.destroy(Object.assign(new Error('timeout'), { code: 'timeout' })));
      req.on('error', (err) => done(`error:${err.code || err.message}`, err.message));
      req.end(body);
    });
  }

  async function worker() {
    while (nowMs() < windowEnd) await once();
  }

  setTimeout(() => {
    windowStarted = true;
    event('window_start');
  }, Math.max(0, windowStart - nowMs()));
  await Promise.all(Array.from({ length: opts.concurrency }, worker));
  if (!windowStarted) event('window_start');
  event('window_end');
  const loadEnd = nowMs();
  agent.destroy();

  // delivery check: wait for the subscriber to have every t1 message of the 200 replies
  let subscriber = null;
  if (sub) {
    const expected = okTotal * t1PerRequest;
    const deadline = nowMs() + opts.drain * 1000;
    while (sub.received < expected && nowMs() < deadline && sub.closed === null) await sleep(20);
    subscriber = {
      topic: 't1', expected, received: sub.received, missing: Math.max(0, expected - sub.received),
      extra: Math.max(0, sub.received - expected), other_frames: sub.other, closed_code: sub.closed,
      drain_ms: Math.round(nowMs() - loadEnd),
    };
    sub.ws.terminate();
  }

  latencies.sort((a, b) => a - b);
  const seconds = opts.seconds;
  const result = {
    mode: opts.mode, concurrency: opts.concurrency, batch: opts.mode === 'batch' ? opts.batch : 1,
    warmup_s: opts.warmup, seconds, requests: inWindow, requests_ok: okInWindow,
    requests_per_s: Math.round(inWindow / seconds), ok_requests_per_s: Math.round(okInWindow / seconds),
    messages_per_s: Math.round((okInWindow * perRequest) / seconds), status,
    non_200: Object.entries(status).reduce((s, [k, v]) => s + (k === '200' ? 0 : v), 0),
    first_error: errorSample, requests_sent_total: sentTotal, requests_ok_total: okTotal,
    latency_ms: {
      samples: latencies.length, p50: quantile(latencies, 0.5), p90: quantile(latencies, 0.9),
      p99: quantile(latencies, 0.99), max: quantile(latencies, 1),
    },
    request_bytes: (batchBody || Buffer.from('{"topic":"t1","data":{"n":0}}')).length,
    subscriber,
  };
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
}

process.on('SIGTERM', () => process.exit(143));
main().catch((err) => {
  process.stderr.write(`api_load.js: ${err.stack || err}\n`);
  process.exit(1);
});
