// A plain `ws` client speaking pushd's own protocol, driven by a Python test (tests/integration/test_centrifuge_node.py).
//
// Usage: node ws_client.mjs URL CA_FILE
// Prints {"event": "open"}, then every frame the server sends as {"event": "frame", "frame": ...}, and
// {"event": "close", "code": N, "reason": "..."}; sends every stdin line as one text frame.
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

import WebSocket from 'ws';

const [url, ca] = process.argv.slice(2);
const socket = new WebSocket(url, { ca: readFileSync(ca), servername: 'localhost' });

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
}

socket.on('open', () => emit('open'));
socket.on('message', (data) => emit('frame', { frame: JSON.parse(data.toString()) }));
socket.on('close', (code, reason) => {
  emit('close', { code, reason: reason.toString() });
  process.exit(0);
});
socket.on('error', (error) => emit('error', { message: error.message }));

createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim()) {
    socket.send(line);
  }
}).on('close', () => socket.close(1000));
