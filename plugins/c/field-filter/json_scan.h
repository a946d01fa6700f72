/* A small JSON scanner: validates a whole document that must be an object and
 * reports the value of one top-level key, in one pass, without building a
 * tree (it allocates only to read a number longer than 63 characters). No
 * libraries beyond the C standard library. */
#ifndef FIELD_FILTER_JSON_SCAN_H
#define FIELD_FILTER_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Deepest nesting accepted: objects and arrays inside one another, the
 * top-level object counting as 1. Deeper documents are treated as invalid,
 * as serde_json (the host's JSON library) does past the same depth. */
#define JSON_MAX_DEPTH 127

typedef enum {
  JSON_NONE = 0, /* the key is not there */
  JSON_STRING,
  JSON_NUMBER,
  JSON_OBJECT,
  JSON_ARRAY,
  JSON_LITERAL /* true, false, null */
} json_kind;

typedef struct {
  json_kind kind;      /* of the value of the last top-level `key` */
  const uint8_t *start; /* the value's text: for a string, the opening quote */
  const uint8_t *end;   /* one past its last byte */
} json_found;

/* Scans `doc[0..len)`. Returns true when it is exactly one JSON object (RFC
 * 8259, whitespace allowed around it) that serde_json would accept too: UTF-8
 * checked, no lone surrogates in \u escapes, every number within the range of
 * a double, nesting at most JSON_MAX_DEPTH deep. Then `*found` tells
 * the value of the LAST top-level member whose decoded name equals
 * `key[0..key_len)` (kind JSON_NONE when there is none). Keys of nested
 * objects are never compared. */
bool json_scan_object(const uint8_t *doc, size_t len, const uint8_t *key,
                      size_t key_len, json_found *found);

/* Decodes the JSON string at [start, end) (as reported by json_scan_object,
 * quotes included) into `out`, which needs room for end - start bytes (a
 * decoded string is never longer). Returns the decoded length. */
size_t json_decode_string(const uint8_t *start, const uint8_t *end,
                          uint8_t *out);

/* The number at [start, end) (as reported by json_scan_object) as a double,
 * read by strtod. */
double json_number_value(const uint8_t *start, const uint8_t *end);

#endif
