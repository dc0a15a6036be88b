'use strict';
// Command-line options shared by the bench's Node scripts: `--name value` or `--name=value`, names in
// kebab-case mapped onto the camelCase keys of a defaults object; numbers where the default is a number.

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

module.exports = { parseOptions };
