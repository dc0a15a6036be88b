// One client of the official `centrifuge` SDK, driven by a Python test (tests/integration/test_centrifuge_node.py).
//
// Usage: node centrifuge_client.mjs CONFIG_JSON
//   CONFIG_JSON: {"url": "wss://localhost:PORT/connection/websocket", "ca": "cert.pem", "token": "...",
//                 "secret": "...", "sub": "alice", "tokenTtls": [2, 3600]}
//   With "secret", getToken signs a fresh HS256 token for "sub" that lives the next of "tokenTtls" seconds; with
//   "tokenChannels" too (a list of channel lists), the token's `channels` claim is the next of them.
// Prints one JSON object per line for every event the SDK emits ({"event": "publication", ...}), and reads
// commands from stdin, one JSON object per line:
//   {"cmd": "subscribe", "channel": C}    {"cmd": "unsubscribe", "channel": C}
//   {"cmd": "history", "channel": C, "limit": N}    {"cmd": "presenceStats", "channel": C}
//   {"cmd": "hold"}: reconnects fail (connection refused) until {"cmd": "release"}
//   {"cmd": "exit"}
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const config = JSON.parse(process.argv[2]);
const tls = { ca: readFileSync(config.ca), servername: 'localhost' };
let held = false;

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
}

// Node 20 has no global WebSocket: the SDK gets `ws`, which trusts the node's certificate, and which refuses to
// reach the node while the test holds reconnects.
class TestWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(held ? 'wss://127.0.0.1:1/' : url, protocols, tls);
  }
}

function base64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

let issued = 0;
async function getToken() {
  const ttl = config.tokenTtls[Math.min(issued, config.tokenTtls.length - 1)];
  const lists = config.tokenChannels;
  const channels = lists ? { channels: lists[Math.min(issued, lists.length - 1)] } : {};
  issued += 1;
  emit('token', { n: issued, ttl });
  const claims = { sub: config.sub, exp: Math.floor(Date.now() / 1000) + ttl, ...channels };
  const body = `${base64url({ alg: 'HS256', typ: 'JWT' })}.${base64url(claims)}`;
  return `${body}.${createHmac('sha256', config.secret).update(body).digest('base64url')}`;
}

const client = new Centrifuge(config.url, {
  token: config.token || '',
  getToken: config.secret ? getToken : null,
  websocket: TestWebSocket,
  minReconnectDelay: 50,
  maxReconnectDelay: 500,
  timeout: 5000,
});

client.on('connecting', (ctx) => emit('connecting', { code: ctx.code, reason: ctx.reason }));
client.on('connected', (ctx) => emit('connected', { client: ctx.client }));
client.on('disconnected', (ctx) => emit('disconnected', { code: ctx.code, reason: ctx.reason }));
client.on('error', (ctx) => emit('error', { type: ctx.type, code: ctx.error.code, message: ctx.error.message }));
client.on('message', (ctx) => emit('message', { data: ctx.data }));

function subscription(channel) {
  const existing = client.getSubscription(channel);
  if (existing) {
    return existing;
  }
  const sub = client.newSubscription(channel, { minResubscribeDelay: 50, maxResubscribeDelay: 500 });
  sub.on('subscribing', (ctx) => emit('subscribing', { channel, code: ctx.code, reason: ctx.reason }));
  sub.on('subscribed', (ctx) => emit('subscribed', {
    channel,
    recoverable: ctx.recoverable,
    positioned: ctx.positioned,
    wasRecovering: ctx.wasRecovering,
    recovered: ctx.recovered,
    streamPosition: ctx.streamPosition,
  }));
  sub.on('unsubscribed', (ctx) => emit('unsubscribed', { channel, code: ctx.code, reason: ctx.reason }));
  sub.on('error', (ctx) => emit('subscriptionError', { channel, code: ctx.error.code, message: ctx.error.message }));
  sub.on('publication', (ctx) => emit('publication', { channel, data: ctx.data, offset: ctx.offset }));
  return sub;
}

async function run(command) {
  try {
    switch (command.cmd) {
      case 'subscribe':
        subscription(command.channel).subscribe();
        break;
      case 'unsubscribe':
        subscription(command.channel).unsubscribe();
        break;
      case 'history': {
        const result = await subscription(command.channel).history({ limit: command.limit });
        emit('history', {
          channel: command.channel,
          offset: result.offset,
          epoch: result.epoch,
          publications: result.publications.map((p) => ({ data: p.data, offset: p.offset })),
        });
        break;
      }
      case 'presenceStats': {
        const result = await subscription(command.channel).presenceStats();
        emit('presenceStats', { channel: command.channel, numClients: result.numClients, numUsers: result.numUsers });
        break;
      }
      case 'hold':
        held = true;
        break;
      case 'release':
        held = false;
        break;
      case 'exit':
        client.disconnect();
        process.exit(0);
        break;
      default:
        emit('badCommand', { command });
    }
  } catch (e) {
    emit('commandError', { cmd: command.cmd, code: e.code, message: e.message });
  }
}

createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim()) {
    run(JSON.parse(line));
  }
}).on('close', () => process.exit(0));

client.connect();
