// What a test page saw, in order: tests/browser/harness.py (Seen) waits on it with findEvent.
"use strict";

window.seen = [];

window.record = (event) => {
  window.seen.push(event);
};

// Whether `value` has every field of `pattern`, recursively (arrays: the same length, each item matching).
function matches(value, pattern) {
  if (pattern === null || typeof pattern !== "object") {
    return value === pattern;
  }
  if (value === null || typeof value !== "object" || Array.isArray(pattern) !== Array.isArray(value)) {
    return false;
  }
  if (Array.isArray(pattern) && pattern.length !== value.length) {
    return false;
  }
  return Object.keys(pattern).every((key) => matches(value[key], pattern[key]));
}

// 1 + the index of the first event from `from` on that matches `pattern`, or 0 (falsy: keep waiting).
window.findEvent = (from, pattern) => {
  for (let index = from; index < window.seen.length; index++) {
    if (matches(window.seen[index], pattern)) {
      return index + 1;
    }
  }
  return 0;
};
