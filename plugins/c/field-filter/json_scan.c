#include "json_scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- strings ---------------------------------------------------------- */

/* Where decoded bytes go: copied to `out` and/or compared with `cmp`. */
typedef struct {
  uint8_t *out;
  const uint8_t *cmp;
  size_t cmp_len;
  size_t pos;
  bool equal;
} sink;

static void emit(sink *s, const uint8_t *bytes, size_t n) {
  if (s->out) memcpy(s->out + s->pos, bytes, n);
  if (s->cmp && s->equal) {
    if (s->pos + n > s->cmp_len || memcmp(s->cmp + s->pos, bytes, n) != 0)
      s->equal = false;
  }
  s->pos += n;
}

/* Encodes a code point (never a surrogate) as UTF-8 and emits it. */
static void emit_code_point(sink *s, uint32_t cp) {
  uint8_t b[4];
  size_t n;
  if (cp < 0x80) {
    b[0] = (uint8_t)cp;
    n = 1;
  } else if (cp < 0x800) {
    b[0] = (uint8_t)(0xC0 | (cp >> 6));
    b[1] = (uint8_t)(0x80 | (cp & 0x3F));
    n = 2;
  } else if (cp < 0x10000) {
    b[0] = (uint8_t)(0xE0 | (cp >> 12));
    b[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    b[2] = (uint8_t)(0x80 | (cp & 0x3F));
    n = 3;
  } else {
    b[0] = (uint8_t)(0xF0 | (cp >> 18));
    b[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    b[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    b[3] = (uint8_t)(0x80 | (cp & 0x3F));
    n = 4;
  }
  emit(s, b, n);
}

static int hex_digit(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Four hex digits at p (end checked by the caller). -1 when not hex. */
static int32_t hex4(const uint8_t *p) {
  int32_t v = 0;
  for (int i = 0; i < 4; i++) {
    int d = hex_digit(p[i]);
    if (d < 0) return -1;
    v = (v << 4) | d;
  }
  return v;
}

/* Length of the valid UTF-8 sequence starting at p (whose first byte is
 * >= 0x80), or 0 when it is not valid (overlong, surrogate, > U+10FFFF,
 * truncated). */
static size_t utf8_sequence(const uint8_t *p, const uint8_t *end) {
  uint8_t c = p[0];
  size_t n;
  uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if ((size_t)(end - p) < n) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < n; i++)
    if ((p[i] & 0xC0) != 0x80) return 0;
  return n;
}

/* *pp points just past an opening quote. On success moves *pp past the
 * closing quote and returns true, having sent the decoded text to `s`. */
static bool read_string(const uint8_t **pp, const uint8_t *end, sink *s) {
  const uint8_t *p = *pp;
  for (;;) {
    /* copy a run of plain ASCII at once */
    const uint8_t *run = p;
    while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') p++;
    if (p > run) emit(s, run, (size_t)(p - run));
    if (p >= end) return false;
    uint8_t c = *p;
    if (c == '"') {
      *pp = p + 1;
      return true;
    }
    if (c < 0x20) return false; /* raw control characters are not allowed */
    if (c >= 0x80) {
      size_t n = utf8_sequence(p, end);
      if (n == 0) return false;
      emit(s, p, n);
      p += n;
      continue;
    }
    /* a backslash escape */
    if (end - p < 2) return false;
    uint8_t e = p[1];
    uint8_t one;
    switch (e) {
      case '"': one = '"'; break;
      case '\\': one = '\\'; break;
      case '/': one = '/'; break;
      case 'b': one = '\b'; break;
      case 'f': one = '\f'; break;
      case 'n': one = '\n'; break;
      case 'r': one = '\r'; break;
      case 't': one = '\t'; break;
      case 'u': {
        /* UTF-16 in \u escapes must be well formed, as serde_json insists:
         * a leading surrogate needs a trailing one right after it, and a
         * trailing surrogate may not stand alone. */
        if (end - p < 6) return false;
        int32_t cp = hex4(p + 2);
        if (cp < 0 || (cp >= 0xDC00 && cp <= 0xDFFF)) return false;
        p += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (end - p < 6 || p[0] != '\\' || p[1] != 'u') return false;
          int32_t lo = hex4(p + 2);
          if (lo < 0xDC00 || lo > 0xDFFF) return false;
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          p += 6;
        }
        emit_code_point(s, (uint32_t)cp);
        continue;
      }
      default:
        return false;
    }
    emit(s, &one, 1);
    p += 2;
  }
}

size_t json_decode_string(const uint8_t *start, const uint8_t *end,
                          uint8_t *out) {
  sink s = {out, NULL, 0, 0, true};
  const uint8_t *p = start + 1; /* past the opening quote */
  if (!read_string(&p, end, &s)) return 0; /* cannot happen once scanned */
  return s.pos;
}

/* ---- numbers ---------------------------------------------------------- */

double json_number_value(const uint8_t *start, const uint8_t *end) {
  /* strtod needs a terminated string; the text is already known to be a
   * valid JSON number, which strtod reads the same way. */
  size_t n = (size_t)(end - start);
  char small[64];
  char *buf = n < sizeof small ? small : malloc(n + 1);
  if (buf == NULL) return 0.0;
  memcpy(buf, start, n);
  buf[n] = '\0';
  double v = strtod(buf, NULL);
  if (buf != small) free(buf);
  return v;
}


static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, and within the range of a
 * double: like serde_json, a number that would round to infinity makes the
 * document invalid. */
static bool read_number(const uint8_t **pp, const uint8_t *end) {
  const uint8_t *start = *pp, *p = *pp;
  size_t int_digits = 0;
  bool exponent = false;
  if (p < end && *p == '-') p++;
  if (p < end && *p == '0') {
    p++;
  } else if (p < end && *p >= '1' && *p <= '9') {
    while (p < end && is_digit(*p)) p++, int_digits++;
  } else {
    return false;
  }
  if (p < end && *p == '.') {
    p++;
    if (p >= end || !is_digit(*p)) return false;
    while (p < end && is_digit(*p)) p++;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    exponent = true;
    p++;
    if (p < end && (*p == '+' || *p == '-')) p++;
    if (p >= end || !is_digit(*p)) return false;
    while (p < end && is_digit(*p)) p++;
  }
  /* DBL_MAX has 309 integer digits: anything shorter without an exponent
   * cannot overflow, so strtod runs only on the rare candidates. */
  if ((exponent || int_digits >= 309) && isinf(json_number_value(start, p)))
    return false;
  *pp = p;
  return true;
}

/* ---- documents -------------------------------------------------------- */

static const uint8_t *skip_ws(const uint8_t *p, const uint8_t *end) {
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
  return p;
}

static bool read_literal(const uint8_t **pp, const uint8_t *end,
                         const char *word, size_t n) {
  if ((size_t)(end - *pp) < n || memcmp(*pp, word, n) != 0) return false;
  *pp += n;
  return true;
}

bool json_scan_object(const uint8_t *doc, size_t len, const uint8_t *key,
                      size_t key_len, json_found *found) {
  /* Containers open above the current value: 1 = object, 0 = array. */
  static uint8_t stack[JSON_MAX_DEPTH];
  size_t depth = 0;
  const uint8_t *p = doc, *end = doc + len;
  bool target = false; /* is the value being read the one we look for? */

  found->kind = JSON_NONE;
  found->start = found->end = NULL;

  p = skip_ws(p, end);
  if (p >= end || *p != '{') return false;
  p++;
  stack[depth++] = 1;
  goto object_start;

object_start: /* just after '{' */
  p = skip_ws(p, end);
  if (p < end && *p == '}') {
    p++;
    depth--;
    goto after_value;
  }
  goto member;

member: /* a member's name, then ':', then its value */
  {
    p = skip_ws(p, end);
    if (p >= end || *p != '"') return false;
    p++;
    bool top = depth == 1;
    sink s = {NULL, top ? key : NULL, key_len, 0, true};
    if (!read_string(&p, end, &s)) return false;
    target = top && s.equal && s.pos == key_len;
    p = skip_ws(p, end);
    if (p >= end || *p != ':') return false;
    p++;
    goto value;
  }

array_start: /* just after '[' */
  p = skip_ws(p, end);
  if (p < end && *p == ']') {
    p++;
    depth--;
    goto after_value;
  }
  target = false;
  goto value;

value:
  {
    p = skip_ws(p, end);
    if (p >= end) return false;
    const uint8_t *start = p;
    json_kind kind;
    switch (*p) {
      case '{':
      case '[':
        if (target) {
          /* a container: the key's value is not a number; remember only
           * that (its text is not needed) */
          found->kind = *p == '{' ? JSON_OBJECT : JSON_ARRAY;
          found->start = found->end = NULL;
          target = false;
        }
        if (depth >= JSON_MAX_DEPTH) return false;
        stack[depth++] = *p == '{';
        p++;
        if (stack[depth - 1]) goto object_start;
        goto array_start;
      case '"':
        p++;
        {
          sink s = {NULL, NULL, 0, 0, true};
          if (!read_string(&p, end, &s)) return false;
        }
        kind = JSON_STRING;
        break;
      case 't':
        if (!read_literal(&p, end, "true", 4)) return false;
        kind = JSON_LITERAL;
        break;
      case 'f':
        if (!read_literal(&p, end, "false", 5)) return false;
        kind = JSON_LITERAL;
        break;
      case 'n':
        if (!read_literal(&p, end, "null", 4)) return false;
        kind = JSON_LITERAL;
        break;
      default:
        if (!read_number(&p, end)) return false;
        kind = JSON_NUMBER;
        break;
    }
    if (target) {
      found->kind = kind;
      found->start = start;
      found->end = p;
      target = false;
    }
    goto after_value;
  }

after_value: /* a value (or a whole container) has just ended */
  if (depth == 0) {
    p = skip_ws(p, end);
    return p == end;
  }
  p = skip_ws(p, end);
  if (p >= end) return false;
  if (stack[depth - 1]) {
    if (*p == ',') {
      p++;
      goto member;
    }
    if (*p == '}') {
      p++;
      depth--;
      goto after_value;
    }
    return false;
  }
  if (*p == ',') {
    p++;
    target = false;
    goto value;
  }
  if (*p == ']') {
    p++;
    depth--;
    goto after_value;
  }
  return false;
}
