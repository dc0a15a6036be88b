'use strict';
// What the bench's Node scripts share: command-line options and the TLS options of their wss clients.

const fs = require('node:fs');
const tls = require('node:tls');

/** `--name value` or `--name=value`, kebab-case names onto the camelCase keys of `defaults`; numbers where the
 * default is a number. */
function parseOptions(defaults, argv) {
  const opts = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}`);
    let key = arg.slice(2);
    let value;
    const eq = key.indexOf('=');
    if (eq >= 0) {
      value = key.slice(eq + 1);
      key = key.slice(0, eq);
    } else {
      value = argv[++i];
    }
    const name = key.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(name in defaults)) throw new Error(`unknown option --${key}`);
    if (value === undefined) throw new Error(`--${key} needs a value`);
    opts[name] = typeof defaults[name] === 'number' ? Number(value) : value;
    if (typeof defaults[name] === 'number' && !Number.isFinite(opts[name])) throw new Error(`--${key}: not a number`);
  }
  return opts;
}

/**
 * TLS options for `ws` clients of a wss URL, one SecureContext for all connections: without it tls.connect
 * builds a new one (CA store included) for every connection, which costs the load generator more than the
 * handshake itself. With `ca` the chain is verified against it; the host name check is skipped because Node's
 * version of it (getPeerCertificate + checkServerIdentity) costs the client ~0.35 ms per connection.
 * Without `ca`, nothing is verified.
 */
function tlsClientOptions(ca, servername) {
  if (!ca) return { secureContext: tls.createSecureContext({}), rejectUnauthorized: false };
  return {
    secureContext: tls.createSecureContext({ ca: fs.readFileSync(ca) }),
    servername,
    rejectUnauthorized: true,
    checkServerIdentity: () => undefined,
  };
}

module.exports = { parseOptions, tlsClientOptions };
