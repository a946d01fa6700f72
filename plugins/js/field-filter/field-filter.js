// field-filter: pass messages whose JSON body has a top-level number above a threshold.
//
// Exports the `filter` world of edgehub:plugin@0.1.0 (wit/plugin.wit).
//
// Settings (the host's `config()`, a JSON object; defaults for missing keys):
//   field  the top-level key to look at     (default "temperature")
//   above  the threshold, strictly greater   (default 25)
//
// A message passes only when its body is a JSON object whose top-level `field`
// is a JSON number greater than `above`; it then gets the application property
// ["alert", "true"] appended. Everything else is dropped.

import { config, log } from 'edgehub:plugin/host@0.1.0';

const DEFAULT_FIELD = 'temperature';
const DEFAULT_ABOVE = 25;

// Deepest nesting accepted (objects and arrays, the top-level object counting
// as 1), as in serde_json and the other versions of this plugin: deeper
// bodies are dropped.
const MAX_DEPTH = 127;
const STRING = /"(?:[^"\\]|\\[^])*"/g;
const BRACKET = /[[\]{}]/g;

// fatal: invalid UTF-8 is an error, not U+FFFD; ignoreBOM: keep a BOM so that
// JSON.parse rejects it, as a strict JSON parser does.
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const hasOwn = Object.prototype.hasOwnProperty;

let settings = null; // { field, above }, read on the first call

// JSON.parse is laxer than serde_json (the host's parser, and the Rust
// version's): it reads 1e400 as Infinity and keeps lone UTF-16 surrogates from
// \u escapes. serde_json rejects such a document, and so do we, checking only
// texts where a quick scan finds an exponent, a 309-digit run or a surrogate
// escape (everything else takes the plain, fast path).
const SUSPECT = /\d[eE]|\d{309}|\\u[dD][89a-fA-F]/;
const ESCAPE = /\\(?:u([0-9a-fA-F]{4})|[^])/g;
const NUMBER = /-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

function hasLoneSurrogate(text) {
  let pending = -1; // where a leading surrogate escape ended, awaiting its pair
  for (const m of text.matchAll(ESCAPE)) {
    const unit = m[1] === undefined ? -1 : parseInt(m[1], 16);
    if (pending >= 0) {
      if (m.index !== pending || unit < 0xdc00 || unit > 0xdfff) return true;
      pending = -1;
    } else if (unit >= 0xdc00 && unit <= 0xdfff) {
      return true;
    } else if (unit >= 0xd800 && unit <= 0xdbff) {
      pending = m.index + m[0].length;
    }
  }
  return pending >= 0;
}

function hasHugeNumber(text) {
  // Outside strings, every run the pattern finds is a number (in valid JSON).
  for (const [num] of text.replace(STRING, '""').matchAll(NUMBER)) {
    if (/[eE]/.test(num) || num.length >= 309) {
      if (!Number.isFinite(Number(num))) return true;
    }
  }
  return false;
}

function parse(text, strict) {
  if (strict && (hasLoneSurrogate(text) || hasHugeNumber(text))) {
    throw new SyntaxError('not accepted by serde_json');
  }
  return JSON.parse(text);
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function loadSettings() {
  let field = DEFAULT_FIELD;
  let above = DEFAULT_ABOVE;
  let cfg = null;
  try {
    cfg = parse(config(), true);
  } catch (_) {
    cfg = null;
  }
  if (isObject(cfg)) {
    if (typeof cfg.field === 'string') {
      field = cfg.field;
    } else if (hasOwn.call(cfg, 'field')) {
      log(1, 'field-filter: config `field` is not a string; using the default');
    }
    if (typeof cfg.above === 'number') {
      above = cfg.above;
    } else if (hasOwn.call(cfg, 'above')) {
      log(1, 'field-filter: config `above` is not a number; using the default');
    }
  } else {
    log(1, 'field-filter: config is not a JSON object; using the defaults');
  }
  return { field, above };
}

function tooDeep(text) {
  // Fewer opening brackets than the limit cannot nest deeper than it.
  let opens = 0;
  for (const open of ['[', '{']) {
    for (let i = text.indexOf(open); i !== -1; i = text.indexOf(open, i + 1)) {
      opens++;
    }
  }
  if (opens <= MAX_DEPTH) return false;
  let depth = 0;
  for (const [b] of text.replace(STRING, '""').matchAll(BRACKET)) {
    if (b === '[' || b === '{') {
      if (++depth > MAX_DEPTH) return true;
    } else {
      depth--;
    }
  }
  return false;
}

export function filter(m) {
  if (settings === null) {
    settings = loadSettings();
  }
  let doc;
  try {
    const text = utf8.decode(m.body);
    if (tooDeep(text)) return undefined;
    doc = parse(text, SUSPECT.test(text));
  } catch (_) {
    return undefined; // not UTF-8 or not JSON: drop
  }
  if (!isObject(doc) || !hasOwn.call(doc, settings.field)) {
    return undefined;
  }
  const value = doc[settings.field];
  if (typeof value !== 'number' || !(value > settings.above)) {
    return undefined;
  }
  m.properties.push(['alert', 'true']);
  return m;
}
