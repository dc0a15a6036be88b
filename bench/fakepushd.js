#!/usr/bin/env node
// A minimal stand-in for pushd, in Node, for calibrating the load generator only (`run.py --server fake`).
//
// It speaks just enough of pushd's protocol for bench/loadgen.js: subscribe -> subscribed, and every message
// PUBLISHed on push:<topic> goes to the topic's subscribers as {"topic":..,"data":..}. Like pushd it frames a
// message once and, for the messages that arrive in one event-loop turn, writes each connection's frames in
// one go (one TLS record). It is NOT pushd: numbers measured against it say how much load the load generator
// (and Redis) can produce and absorb on this machine, i.e. the ceiling above which a pushd result would be
// measuring the harness instead of the server.
//
//   node fakepushd.js --redis redis://127.0.0.1:6379 [--port 0] [--key KEY --cert CERT]
//
// Prints "pushd ready: node fake, WebSocket at ws(s)://localhost:PORT/ws, Redis ..." like pushd; stops on
// SIGTERM/SIGINT.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');

const Redis = require('ioredis');
const { WebSocketServer } = require('ws');

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const redisUrl = args.redis || 'redis://127.0.0.1:6379';
const tls = Boolean(args.key && args.cert);

const server = tls
  ? https.createServer({ key: fs.readFileSync(args.key), cert: fs.readFileSync(args.cert) })
  : http.createServer();
const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false, backlog: 511 });
const topics = new Map(); // topic -> Set of sockets

wss.on('connection', (ws) => {
  ws.topics = new Set();
  ws.on('message', (data) => {
    let cmd;
    try {
      cmd = JSON.parse(data.toString());
    } catch {
      return;
    }
    if (cmd.op === 'subscribe' && Array.isArray(cmd.topics)) {
      for (const t of cmd.topics) {
        if (!topics.has(t)) topics.set(t, new Set());
        topics.get(t).add(ws);
        ws.topics.add(t);
      }
      ws.send(JSON.stringify({ op: 'subscribed', topics: cmd.topics }));
    }
  });
  ws.on('close', () => {
    for (const t of ws.topics) topics.get(t)?.delete(ws);
  });
});

// messages of one event-loop turn, written per connection in one go
let batch = null;
function flush() {
  const pending = new Map();
  for (const [topic, frame] of batch) {
    for (const ws of topics.get(topic) || []) {
      const list = pending.get(ws);
      if (list) list.push(frame);
      else pending.set(ws, [frame]);
    }
  }
  batch = null;
  for (const [ws, frames] of pending) {
    const sock = ws._socket;
    sock.cork();
    for (const f of frames) ws.send(f);
    sock.uncork();
  }
}

const sub = new Redis(redisUrl, { lazyConnect: true });
sub.on('pmessageBuffer', (_pattern, channel, message) => {
  const topic = channel.subarray(5).toString();
  const frame = Buffer.concat([Buffer.from(`{"topic":"${topic}","data":`), message, Buffer.from('}')]);
  if (batch === null) {
    batch = [];
    setImmediate(flush);
  }
  batch.push([topic, frame]);
});

async function main() {
  await sub.connect();
  await sub.psubscribe('push:*');
  server.listen(Number(args.port || 0), '127.0.0.1', () => {
    const { port } = server.address();
    console.log(
      `pushd ready: node fake, WebSocket at ${tls ? 'wss' : 'ws'}://localhost:${port}/ws, Redis ${redisUrl}`,
    );
  });
}

function stop() {
  for (const ws of wss.clients) ws.terminate();
  server.close();
  sub.disconnect();
  setImmediate(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
main().catch((err) => {
  console.error(`fakepushd: ${err.message}`);
  process.exit(1);
});
