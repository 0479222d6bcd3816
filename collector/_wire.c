/* collector._wire: calltrace's hot loops over the OTLP wire format, in C.
 *
 * Python reads a protobuf field through upb's objects one call at a time, an order of
 * magnitude slower for the storage exporters' rows than walking the bytes in C. Each function
 * here has a Python twin that stays the reference, and the fallback where this module is
 * not built; tests/core/test_wire.py and test_otlp_json.py hold each pair to the same
 * output on the captured fixtures and on generated input.
 *
 * - build_rows: collector.storage.build_rows off a serialized ExportTraceServiceRequest,
 *   each span's bytes sliced from the input instead of serialized again;
 * - check_spans: whether collector.receivers.otlp.drop_invalid_spans has work to do;
 * - stream_commands: exporters/redis_streams.py's commands, packed in the Redis protocol
 *   without the GIL; count_replies: their replies, counted in the bytes;
 * - json_to_wire: collector.otlp_json's OTLP/JSON -> protobuf writer, for the common
 *   cases (it returns None for the rest, which Python handles, errors included);
 * - resource_spans_layout: where a request's ResourceSpans are, so that those whose
 *   spans no processor touched are written out again from the received bytes;
 * - execute_steps: the sqlite exporter's writes of a batch with the GIL released once,
 *   span rows straight from the bytes (build_rows' plan says where the spans are and
 *   what their rows point at), other rows as executemany would write them;
 * - execute_rows: executemany with the GIL released once, RETURNING ids collected.
 *
 * Field numbers are those of opentelemetry/proto/trace/v1/trace.proto and
 * common/v1/common.proto. Input that is not well-formed protobuf raises ValueError;
 * callers then take the Python path, whose parser reports the error as upb does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_INDEXED_VALUE 256 /* storage.MAX_INDEXED_VALUE: longer values are not indexed */
#define STATUS_ERROR 2

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };

/* How deep groups may nest: upb's default depth limit (kUpb_WireFormat_DefaultDepthLimit). */
#define MAX_GROUP_DEPTH 100

typedef struct {
    uint32_t number;
    int type;
    uint64_t value;      /* varint, i64, i32 */
    const uint8_t *data; /* LEN */
    Py_ssize_t len;
} Field;

static int
read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t value = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        uint8_t byte = *p++;
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *pp = p;
            *out = value;
            return 0;
        }
    }
    return -1;
}

/* Past the group field number (deprecated; upb keeps one as an unknown field) whose
 * start tag was just read: its fields up to its end tag, groups within included. 0, or
 * -1 if malformed (no end tag, another group's, too deep). As upb skips a group, a
 * field within it may have number 0 (a 32-bit tag is all it asks). */
static int
skip_group(const uint8_t **pp, const uint8_t *end, uint64_t number, int depth)
{
    uint64_t tag, value;
    if (depth > MAX_GROUP_DEPTH)
        return -1;
    for (;;) {
        if (*pp >= end || read_varint(pp, end, &tag) < 0 || tag > UINT32_MAX)
            return -1;
        switch (tag & 7) {
        case WT_VARINT:
            if (read_varint(pp, end, &value) < 0)
                return -1;
            break;
        case WT_I64:
            if (end - *pp < 8)
                return -1;
            *pp += 8;
            break;
        case WT_I32:
            if (end - *pp < 4)
                return -1;
            *pp += 4;
            break;
        case WT_LEN:
            if (read_varint(pp, end, &value) < 0 || value > (uint64_t)(end - *pp))
                return -1;
            *pp += value;
            break;
        case WT_SGROUP:
            if (skip_group(pp, end, tag >> 3, depth + 1) < 0)
                return -1;
            break;
        case WT_EGROUP:
            return (tag >> 3) == number ? 0 : -1;
        default:
            return -1;
        }
    }
}

/* The next field of a message: 1, 0 at its end, -1 if malformed; sets no exception, so
 * it runs without the GIL (next_field sets ValueError). A group is a field of type
 * WT_SGROUP whose data is its contents; no reader here looks into one. */
static int
scan_field(const uint8_t **pp, const uint8_t *end, Field *f)
{
    uint64_t tag, len;
    if (*pp >= end)
        return 0;
    if (read_varint(pp, end, &tag) < 0 || (tag >> 3) == 0 || (tag >> 3) > UINT32_MAX)
        goto malformed;
    f->number = (uint32_t)(tag >> 3);
    f->type = (int)(tag & 7);
    switch (f->type) {
    case WT_VARINT:
        if (read_varint(pp, end, &f->value) < 0)
            goto malformed;
        return 1;
    case WT_I64:
        if (end - *pp < 8)
            goto malformed;
        memcpy(&f->value, *pp, 8); /* little-endian on the wire, as on x86 and arm64 */
        *pp += 8;
        return 1;
    case WT_I32: {
        uint32_t v;
        if (end - *pp < 4)
            goto malformed;
        memcpy(&v, *pp, 4);
        f->value = v;
        *pp += 4;
        return 1;
    }
    case WT_LEN:
        if (read_varint(pp, end, &len) < 0 || len > (uint64_t)(end - *pp))
            goto malformed;
        f->data = *pp;
        f->len = (Py_ssize_t)len;
        *pp += len;
        return 1;
    case WT_SGROUP: {
        const uint8_t *start = *pp;
        if (skip_group(pp, end, f->number, 1) < 0)
            goto malformed;
        f->data = start;
        f->len = *pp - start;
        return 1;
    }
    default: /* an end tag without its group, invalid wire types */
        goto malformed;
    }
malformed:
    return -1;
}

static void
set_malformed(void)
{
    PyErr_SetString(PyExc_ValueError, "malformed protobuf");
}

/* The next field of a message: 1, 0 at its end, -1 (ValueError set) if malformed. */
static int
next_field(const uint8_t **pp, const uint8_t *end, Field *f)
{
    int r = scan_field(pp, end, f);
    if (r < 0)
        set_malformed();
    return r;
}

static uint64_t hash_bytes(const uint8_t *p, Py_ssize_t n);

/* A trace's distinct span names, by their bytes: the (name, trace id) pair of a name
 * is made and added to the batch's set the first time the trace has it. */
typedef struct {
    uint64_t hash;
    const uint8_t *data; /* NULL: an empty slot */
    Py_ssize_t len;
    PyObject *name; /* borrowed: the pair in Batch.names holds it */
} NameSlot;

/* What a batch accumulates per trace; turned into BatchRows.traces and .trace_attrs.
 * The per-trace tables below let a span add to the batch's Python sets only what its
 * trace does not have yet: made and hashed for every span, the pairs were most of
 * build_rows' time (a trace's spans repeat a few names, one call and their resources'
 * and libraries' attributes). */
typedef struct {
    const uint8_t *id; /* its bytes in the payload (the key of Traces' table) */
    Py_ssize_t id_len;
    uint64_t id_hash;
    PyObject *trace_id;
    PyObject *call_id; /* the first non-None */
    PyObject *service; /* of the trace's first span */
    PyObject *root_name, *root_span_id;
    PyObject *attrs; /* set of (key, text) */
    uint64_t start, end;
    int has_error;
    PyObject *resource_attrs; /* borrowed: the last resource's pairs it got */
    PyObject *traced_call;    /* borrowed: the last call id its (call, trace) pair had */
    NameSlot *names;
    size_t names_mask, names_count;
    PyObject **pairs; /* attribute pairs added to attrs, by identity (references) */
    size_t pairs_mask, pairs_count;
} Trace;

typedef struct {
    Trace *items;
    Py_ssize_t count, capacity;
    Py_ssize_t *slots; /* open addressing over the ids' hashes: position + 1, 0 empty */
    size_t mask;
} Traces;

static void
traces_free(Traces *t)
{
    for (Py_ssize_t i = 0; i < t->count; i++) {
        Trace *tr = &t->items[i];
        Py_XDECREF(tr->trace_id);
        Py_XDECREF(tr->call_id);
        Py_XDECREF(tr->service);
        Py_XDECREF(tr->root_name);
        Py_XDECREF(tr->root_span_id);
        Py_XDECREF(tr->attrs);
        PyMem_Free(tr->names);
        for (size_t j = 0; tr->pairs != NULL && j <= tr->pairs_mask; j++)
            Py_XDECREF(tr->pairs[j]);
        PyMem_Free(tr->pairs);
    }
    PyMem_Free(t->items);
    PyMem_Free(t->slots);
}

/* Room for one more entry in a table of ``*mask + 1`` slots holding ``count``: doubled
 * once it would be more than half full. 0, or -1 with MemoryError set. */
static int
traces_reserve(Traces *t)
{
    if (t->slots != NULL && (size_t)(t->count + 1) * 2 <= t->mask + 1)
        return 0;
    size_t size = t->slots == NULL ? 128 : (t->mask + 1) * 2;
    Py_ssize_t *slots = PyMem_Calloc(size, sizeof *slots);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < t->count; i++) {
        size_t j = t->items[i].id_hash & (size - 1);
        while (slots[j])
            j = (j + 1) & (size - 1);
        slots[j] = i + 1;
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->mask = size - 1;
    return 0;
}

static Trace *
trace_for(Traces *t, const uint8_t *id, Py_ssize_t id_len, PyObject *call_id, PyObject *service,
          uint64_t start, uint64_t end)
{
    if (traces_reserve(t) < 0)
        return NULL;
    uint64_t h = hash_bytes(id, id_len);
    size_t j = h & t->mask;
    for (; t->slots[j]; j = (j + 1) & t->mask) {
        Trace *tr = &t->items[t->slots[j] - 1];
        if (tr->id_hash != h || tr->id_len != id_len || memcmp(tr->id, id, (size_t)id_len))
            continue;
        if (tr->call_id == Py_None && call_id != Py_None) {
            Py_INCREF(call_id);
            Py_SETREF(tr->call_id, call_id);
        }
        if (start < tr->start)
            tr->start = start;
        if (end > tr->end)
            tr->end = end;
        return tr;
    }
    if (t->count == t->capacity) {
        Py_ssize_t capacity = t->capacity ? t->capacity * 2 : 64;
        Trace *items = PyMem_Realloc(t->items, capacity * sizeof(Trace));
        if (items == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        t->items = items;
        t->capacity = capacity;
    }
    PyObject *trace_id = PyBytes_FromStringAndSize((const char *)id, id_len);
    PyObject *attrs = trace_id == NULL ? NULL : PySet_New(NULL);
    if (attrs == NULL) {
        Py_XDECREF(trace_id);
        return NULL;
    }
    t->slots[j] = t->count + 1;
    Trace *tr = &t->items[t->count++];
    Py_INCREF(call_id);
    Py_INCREF(service);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    *tr = (Trace){id,     id_len, h, trace_id, call_id, service, Py_None, Py_None, attrs,
                  start, end,    0, NULL,     NULL,    NULL,    0,       0,       NULL,
                  0,     0};
    return tr;
}

/* The trace's slot for a name's bytes: the one holding them, or the empty one where they
 * go (NULL with MemoryError set). */
static NameSlot *
trace_name_slot(Trace *tr, const uint8_t *data, Py_ssize_t len)
{
    if (tr->names == NULL || (tr->names_count + 1) * 2 > tr->names_mask + 1) {
        size_t size = tr->names == NULL ? 16 : (tr->names_mask + 1) * 2;
        NameSlot *slots = PyMem_Calloc(size, sizeof *slots);
        if (slots == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        for (size_t i = 0; tr->names != NULL && i <= tr->names_mask; i++) {
            if (tr->names[i].data == NULL)
                continue;
            size_t j = tr->names[i].hash & (size - 1);
            while (slots[j].data != NULL)
                j = (j + 1) & (size - 1);
            slots[j] = tr->names[i];
        }
        PyMem_Free(tr->names);
        tr->names = slots;
        tr->names_mask = size - 1;
    }
    uint64_t h = hash_bytes(data, len);
    size_t j = h & tr->names_mask;
    for (; tr->names[j].data != NULL; j = (j + 1) & tr->names_mask) {
        NameSlot *slot = &tr->names[j];
        if (slot->hash == h && slot->len == len && memcmp(slot->data, data, (size_t)len) == 0)
            return slot;
    }
    tr->names[j].hash = h;
    tr->names[j].len = len;
    return &tr->names[j]; /* data still NULL: the caller fills it in */
}

static size_t
pointer_hash(const void *p)
{
    uint64_t h = (uint64_t)(uintptr_t)p;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    return (size_t)(h ^ (h >> 33));
}

/* Whether ``pair`` was added to the trace's attrs already, by identity (an equal pair
 * that is another object is left to the set); notes it as added from now on. -1:
 * MemoryError. */
static int
trace_has_pair(Trace *tr, PyObject *pair)
{
    if (tr->pairs == NULL || (tr->pairs_count + 1) * 2 > tr->pairs_mask + 1) {
        size_t size = tr->pairs == NULL ? 64 : (tr->pairs_mask + 1) * 2;
        PyObject **slots = PyMem_Calloc(size, sizeof *slots);
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; tr->pairs != NULL && i <= tr->pairs_mask; i++) {
            if (tr->pairs[i] == NULL)
                continue;
            size_t j = pointer_hash(tr->pairs[i]) & (size - 1);
            while (slots[j] != NULL)
                j = (j + 1) & (size - 1);
            slots[j] = tr->pairs[i];
        }
        PyMem_Free(tr->pairs);
        tr->pairs = slots;
        tr->pairs_mask = size - 1;
    }
    size_t j = pointer_hash(pair) & tr->pairs_mask;
    for (; tr->pairs[j] != NULL; j = (j + 1) & tr->pairs_mask)
        if (tr->pairs[j] == pair)
            return 1;
    /* Held here, not only by attrs: a set keeps the first of equal pairs, so attrs may
     * hold another, and this one, freed, could come back as a different pair at the
     * same address. */
    tr->pairs[j] = Py_NewRef(pair);
    tr->pairs_count++;
    return 0;
}

/* The tuples made here hold only str, bytes, int and None, so they can be in no
 * reference cycle: untracked, the cyclic garbage collector never scans them. Tracked,
 * the tuples each span makes would set off collections that scan every live row. */
static void
untrack(PyObject *tuple)
{
    if (PyObject_GC_IsTracked(tuple))
        PyObject_GC_UnTrack(tuple);
}

static PyObject *
utf8(const uint8_t *data, Py_ssize_t len)
{
    return PyUnicode_DecodeUTF8((const char *)data, len, NULL);
}

static PyObject *TRUE_TEXT, *FALSE_TEXT;

/* Whether f is a member of AnyValue's oneof as upb reads it: a member's field number
 * with another wire type is an unknown field, which leaves the oneof as it was. */
static int
any_value_member(const Field *f)
{
    switch (f->number) {
    case 1: /* string_value */
    case 5: /* array_value */
    case 6: /* kvlist_value */
    case 7: /* bytes_value */
        return f->type == WT_LEN;
    case 2: /* bool_value */
    case 3: /* int_value */
        return f->type == WT_VARINT;
    case 4: /* double_value */
        return f->type == WT_I64;
    default:
        return 0;
    }
}

/* The AnyValue of the KeyValue in [p, end) as protobuf reads it: the key (b"" if
 * absent; the last on the wire wins), whether a value field is there, and its oneof
 * member (number 0: unset). The value field's occurrences merge (one message written in
 * parts), so the last member over all of them wins. 0, or -1 if malformed. */
static int
read_key_value(const uint8_t *p, const uint8_t *end, const uint8_t **key, Py_ssize_t *key_len,
               int *has_value, Field *kind)
{
    Field f, g;
    int r;
    *key = (const uint8_t *)"", *key_len = 0, *has_value = 0;
    *kind = (Field){0};
    while ((r = next_field(&p, end, &f)) > 0) {
        if (f.type != WT_LEN)
            continue;
        if (f.number == 1)
            *key = f.data, *key_len = f.len;
        else if (f.number == 2) {
            const uint8_t *q = f.data, *qend = f.data + f.len;
            int t;
            *has_value = 1;
            while ((t = next_field(&q, qend, &g)) > 0)
                if (any_value_member(&g))
                    *kind = g; /* a oneof: the last member on the wire wins */
            if (t < 0)
                return -1;
        }
    }
    return r;
}

/* attribute_text of an AnyValue whose oneof member is kind (number 0: unset): a new
 * reference, Py_None (new) if not indexed, NULL on error. Matches
 * collector.storage.attribute_text: strings up to 256 characters, bools as true/false,
 * ints in decimal, floats as str(int(x)) when whole, else repr(x). */
static PyObject *
value_text(Field kind)
{
    switch (kind.number) {
    case 1: {
        if (kind.type != WT_LEN)
            break;
        if (kind.len > 4 * MAX_INDEXED_VALUE) /* > 256 characters whatever they are */
            break;
        PyObject *text = utf8(kind.data, kind.len);
        if (text == NULL)
            return NULL;
        if (kind.len > MAX_INDEXED_VALUE && PyUnicode_GET_LENGTH(text) > MAX_INDEXED_VALUE) {
            Py_DECREF(text);
            break;
        }
        return text;
    }
    case 2:
        if (kind.type != WT_VARINT)
            break;
        return Py_NewRef(kind.value ? TRUE_TEXT : FALSE_TEXT);
    case 3: {
        if (kind.type != WT_VARINT)
            break;
        PyObject *number = PyLong_FromLongLong((long long)kind.value);
        if (number == NULL)
            return NULL;
        PyObject *text = PyObject_Str(number);
        Py_DECREF(number);
        return text;
    }
    case 4: {
        double x;
        if (kind.type != WT_I64)
            break;
        memcpy(&x, &kind.value, 8);
        PyObject *number = (isfinite(x) && floor(x) == x) ? PyLong_FromDouble(x)
                                                          : PyFloat_FromDouble(x);
        if (number == NULL)
            return NULL;
        PyObject *text = PyLong_Check(number) ? PyObject_Str(number) : PyObject_Repr(number);
        Py_DECREF(number);
        return text;
    }
    default: /* unset, arrays, maps, bytes */
        break;
    }
    Py_RETURN_NONE;
}

/* (key, attribute_text(value)) of a key and an AnyValue (has_value 0: absent), both
 * strings interned if asked: a new reference, Py_None (new) if the value is not indexed, NULL
 * on error. */
static PyObject *
pair_of(const uint8_t *key, Py_ssize_t key_len, int has_value, Field kind, int interned)
{
    if (!has_value)
        Py_RETURN_NONE; /* no value: nothing indexed */
    PyObject *text = value_text(kind);
    if (text == NULL || text == Py_None)
        return text;
    PyObject *k = utf8(key, key_len);
    if (k == NULL) {
        Py_DECREF(text);
        return NULL;
    }
    if (interned) {
        PyUnicode_InternInPlace(&k);
        PyUnicode_InternInPlace(&text);
    }
    PyObject *pair = PyTuple_Pack(2, k, text);
    Py_DECREF(k);
    Py_DECREF(text);
    if (pair != NULL)
        untrack(pair);
    return pair;
}

static PyObject *
attribute_pair(const uint8_t *p, const uint8_t *end)
{
    const uint8_t *key;
    Py_ssize_t key_len;
    int has_value;
    Field kind;
    if (read_key_value(p, end, &key, &key_len, &has_value, &kind) < 0)
        return NULL;
    return pair_of(key, key_len, has_value, kind, 0);
}

/* Recent KeyValues' pairs, by their bytes: most attributes repeat (models, providers,
 * voices, services), and looking their bytes up costs less than decoding key and value
 * and hashing a new pair. Direct-mapped: a
 * collision replaces the slot, so unique values (transcripts, ids) never grow it. */
#define CACHE_SLOTS 16384 /* a power of two */
#define CACHE_MAX_BYTES 320
typedef struct {
    uint64_t hash;
    PyObject *raw;  /* the KeyValue's bytes */
    PyObject *pair; /* its pair, or Py_None */
} CacheSlot;
static CacheSlot cache[CACHE_SLOTS];

static uint64_t
hash_bytes(const uint8_t *p, Py_ssize_t n)
{
    uint64_t h = 0x9e3779b97f4a7c15ull ^ (uint64_t)n, k;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&k, p, 8);
        h ^= k * 0xff51afd7ed558ccdull;
        h = ((h << 31) | (h >> 33)) * 0xc4ceb9fe1a85ec53ull;
    }
    k = 0;
    memcpy(&k, p, (size_t)n);
    h ^= k * 0xff51afd7ed558ccdull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
}

/* Adds (key, attribute_text(value)) of the KeyValue in [p, p + len) to the trace's attrs
 * if indexed (and not there already: see trace_has_pair). */
static int
add_attribute(Trace *tr, const uint8_t *p, Py_ssize_t len)
{
    PyObject *pair;
    if (len > CACHE_MAX_BYTES) {
        pair = attribute_pair(p, p + len);
        if (pair == NULL)
            return -1;
    }
    else {
        uint64_t h = hash_bytes(p, len);
        CacheSlot *slot = &cache[h & (CACHE_SLOTS - 1)];
        if (slot->raw != NULL && slot->hash == h && PyBytes_GET_SIZE(slot->raw) == len &&
            memcmp(PyBytes_AS_STRING(slot->raw), p, (size_t)len) == 0) {
            pair = Py_NewRef(slot->pair);
        }
        else {
            pair = attribute_pair(p, p + len);
            if (pair == NULL)
                return -1;
            PyObject *raw = PyBytes_FromStringAndSize((const char *)p, len);
            if (raw == NULL) {
                Py_DECREF(pair);
                return -1;
            }
            Py_XSETREF(slot->raw, raw);
            Py_XSETREF(slot->pair, Py_NewRef(pair));
            slot->hash = h;
        }
    }
    int r = 0;
    if (pair != Py_None) {
        r = trace_has_pair(tr, pair);
        if (r == 0)
            r = PySet_Add(tr->attrs, pair);
        else if (r == 1)
            r = 0;
    }
    Py_DECREF(pair);
    return r;
}

static PyObject *
bytes_or_none(const uint8_t *data, Py_ssize_t len)
{
    if (len == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)data, len);
}

typedef struct {
    PyObject *project;
    PyObject *spans;       /* list of span rows */
    PyObject *names;       /* set of (name, trace_id) */
    PyObject *call_traces; /* set of (call_id, trace_id) */
    Traces traces;
    const uint8_t *payload; /* where the plan's offsets count from */
    int span_rows;          /* 0: spans holds the insert plan (see build_rows' doc) */
    PyObject *scope_refs;   /* scope bytes -> scope_cb's answer (see memo_call) */
} Batch;

typedef struct {
    PyObject *ref, *call_id, *service, *attrs; /* borrowed from resource_cb's answer */
    uint64_t start_min, end_max;
    int has_spans;
} Resource;

static int
add_pair(PyObject *set, PyObject *a, PyObject *b)
{
    PyObject *pair = PyTuple_Pack(2, a, b);
    if (pair == NULL)
        return -1;
    untrack(pair);
    int r = PySet_Add(set, pair);
    Py_DECREF(pair);
    return r;
}

/* The fields of a Span that rows, checks and stream entries read. Absent bytes fields
 * point at the span with length 0; for repeated scalars the last on the wire wins.
 * read_span_fields returns -1 if the span is malformed, with no exception set (it runs
 * without the GIL in execute_steps); span_fields sets ValueError. */
typedef struct {
    const uint8_t *trace_id, *span_id, *parent, *name;
    Py_ssize_t trace_id_len, span_id_len, parent_len, name_len;
    int32_t kind, status;
    uint64_t start, end;
    int has_attributes;
} SpanFields;

/* A span time as storage keeps it (storage.MAX_STORED_NS): fixed64 times past SQLite's
 * and PostgreSQL's signed 64-bit integers (after the year 2262) are stored as the
 * largest one; the span's bytes keep the time as sent. */
static inline uint64_t
stored_ns(uint64_t ns)
{
    return ns > (uint64_t)INT64_MAX ? (uint64_t)INT64_MAX : ns;
}

static int
read_span_fields(const uint8_t *span, Py_ssize_t span_len, SpanFields *s)
{
    const uint8_t *p = span, *end = span + span_len;
    *s = (SpanFields){span, span, span, span, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    Field f;
    int r;
    while ((r = scan_field(&p, end, &f)) > 0) {
        if (f.type == WT_LEN) {
            switch (f.number) {
            case 1:
                s->trace_id = f.data, s->trace_id_len = f.len;
                break;
            case 2:
                s->span_id = f.data, s->span_id_len = f.len;
                break;
            case 4:
                s->parent = f.data, s->parent_len = f.len;
                break;
            case 5:
                s->name = f.data, s->name_len = f.len;
                break;
            case 9:
                s->has_attributes = 1;
                break;
            case 15: { /* Status: code is field 3; occurrences merge, a later code wins */
                const uint8_t *q = f.data, *qend = f.data + f.len;
                Field g;
                int t;
                while ((t = scan_field(&q, qend, &g)) > 0)
                    if (g.number == 3 && g.type == WT_VARINT)
                        s->status = (int32_t)g.value;
                if (t < 0)
                    return -1;
                break;
            }
            }
        }
        else if (f.number == 6 && f.type == WT_VARINT)
            s->kind = (int32_t)f.value;
        else if (f.number == 7 && f.type == WT_I64)
            s->start = f.value;
        else if (f.number == 8 && f.type == WT_I64)
            s->end = f.value;
    }
    return r;
}

static int
span_fields(const uint8_t *span, Py_ssize_t span_len, SpanFields *s)
{
    int r = read_span_fields(span, span_len, s);
    if (r < 0)
        set_malformed();
    return r;
}

/* The trace's name object for the span name in [data, data + len), made and paired with
 * the trace id in Batch.names the first time the trace has that name. Borrowed. */
static PyObject *
trace_name(Batch *b, Trace *tr, const uint8_t *data, Py_ssize_t len)
{
    NameSlot *slot = trace_name_slot(tr, data, len);
    if (slot == NULL)
        return NULL;
    if (slot->data != NULL)
        return slot->name;
    PyObject *name = utf8(data, len);
    if (name == NULL)
        return NULL;
    int added = add_pair(b->names, name, tr->trace_id);
    Py_DECREF(name); /* the pair in names holds it */
    if (added < 0)
        return NULL;
    slot->data = data;
    slot->name = name;
    tr->names_count++;
    return name;
}

static int
read_span(Batch *b, Resource *res, PyObject *scope_ref, const uint8_t *span, Py_ssize_t span_len)
{
    const uint8_t *p, *end = span + span_len;
    SpanFields s;
    Field f;
    int r;
    if (span_fields(span, span_len, &s) < 0)
        return -1;
    uint64_t start = stored_ns(s.start), stop = stored_ns(s.end);
    if (stop < start)
        stop = start; /* a clock glitch must not produce negative durations */

    Trace *tr = trace_for(&b->traces, s.trace_id, s.trace_id_len, res->call_id, res->service,
                          start, stop);
    if (tr == NULL)
        return -1;
    PyObject *tid = tr->trace_id; /* borrowed, as nm */
    PyObject *nm = trace_name(b, tr, s.name, s.name_len);
    if (nm == NULL)
        return -1;
    int root = s.parent_len == 0;
    if (b->span_rows || root) {
        PyObject *sid = PyBytes_FromStringAndSize((const char *)s.span_id, s.span_id_len);
        if (sid == NULL)
            return -1;
        if (root) { /* a root: the last one seen names the trace */
            Py_INCREF(nm);
            Py_SETREF(tr->root_name, nm);
            Py_INCREF(sid);
            Py_SETREF(tr->root_span_id, sid);
        }
        if (b->span_rows) {
            PyObject *pid = bytes_or_none(s.parent, s.parent_len);
            PyObject *row =
                pid == NULL
                    ? NULL
                    : Py_BuildValue("(OOOOOiKKKiOOOy#)", b->project, tid, sid, pid, nm,
                                    (int)s.kind, (unsigned long long)start,
                                    (unsigned long long)stop, (unsigned long long)(stop - start),
                                    (int)s.status, res->call_id, res->ref, scope_ref,
                                    (const char *)span, span_len);
            Py_XDECREF(pid);
            int added = row == NULL ? -1 : PyList_Append(b->spans, row);
            if (row != NULL)
                untrack(row);
            Py_XDECREF(row);
            if (added < 0) {
                Py_DECREF(sid);
                return -1;
            }
        }
        Py_DECREF(sid);
    }
    if (res->call_id != Py_None && tr->traced_call != res->call_id) {
        if (add_pair(b->call_traces, res->call_id, tid) < 0)
            return -1;
        tr->traced_call = res->call_id; /* the resource's answer (kept all along) holds it */
    }
    if (s.status == STATUS_ERROR)
        tr->has_error = 1;
    if (tr->resource_attrs != res->attrs) { /* each trace gets its resources' attributes */
        tr->resource_attrs = res->attrs;
        PyObject *it = PyObject_GetIter(res->attrs), *pair;
        if (it == NULL)
            return -1;
        while ((pair = PyIter_Next(it)) != NULL) {
            int added = PySet_Add(tr->attrs, pair);
            Py_DECREF(pair);
            if (added < 0)
                break;
        }
        Py_DECREF(it);
        if (PyErr_Occurred())
            return -1;
    }
    if (s.has_attributes) {
        p = span;
        while ((r = next_field(&p, end, &f)) > 0)
            if (f.number == 9 && f.type == WT_LEN && add_attribute(tr, f.data, f.len) < 0)
                return -1;
        if (r < 0)
            return -1;
    }
    if (!res->has_spans || start < res->start_min)
        res->start_min = start;
    if (!res->has_spans || stop > res->end_max)
        res->end_max = stop;
    res->has_spans = 1;
    return 0;
}

/* A message field of the message in [p, end), as bytes: b"" if absent, its one
 * occurrence's bytes, or, where it occurs several times (one message written in parts,
 * which protobuf merges), their concatenation, which parses to the merged message. */
static PyObject *
submessage(const uint8_t *p, const uint8_t *end, uint32_t number)
{
    const uint8_t *data = NULL, *start = p;
    Py_ssize_t len = 0, total = 0, count = 0;
    Field f;
    int r;
    while ((r = next_field(&p, end, &f)) > 0)
        if (f.number == number && f.type == WT_LEN)
            data = f.data, len = f.len, total += f.len, count++;
    if (r < 0)
        return NULL;
    if (count <= 1)
        return PyBytes_FromStringAndSize(data ? (const char *)data : "", len);
    PyObject *merged = PyBytes_FromStringAndSize(NULL, total);
    if (merged == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(merged);
    for (p = start; next_field(&p, end, &f) > 0;)
        if (f.number == number && f.type == WT_LEN) {
            memcpy(out, f.data, (size_t)f.len);
            out += f.len;
        }
    return merged;
}

/* cb(key), asked once per distinct key in ``memo``'s call and answered from ``memo``
 * after that: a batch repeats a few resources and scopes many times, and a Python call
 * costs a span's whole row. New reference. */
static PyObject *
memo_call(PyObject *memo, PyObject *cb, PyObject *key)
{
    PyObject *answer = PyDict_GetItemWithError(memo, key);
    if (answer != NULL) {
        Py_INCREF(answer);
        return answer;
    }
    if (PyErr_Occurred())
        return NULL;
    answer = PyObject_CallOneArg(cb, key);
    if (answer != NULL && PyDict_SetItem(memo, key, answer) < 0)
        Py_CLEAR(answer);
    return answer;
}

static int
read_scope_spans(Batch *b, Resource *res, PyObject *scope_cb, const uint8_t *ss, Py_ssize_t len)
{
    const uint8_t *end = ss + len, *p = ss;
    PyObject *scope = submessage(ss, end, 1);
    if (scope == NULL)
        return -1;
    PyObject *scope_ref = memo_call(b->scope_refs, scope_cb, scope);
    Py_DECREF(scope);
    if (scope_ref == NULL)
        return -1;
    if (!b->span_rows) { /* the plan: where these spans are and what their rows point at */
        PyObject *entry = Py_BuildValue("(nnOOO)", (Py_ssize_t)(ss - b->payload), len,
                                        res->call_id, res->ref, scope_ref);
        int added = entry == NULL ? -1 : PyList_Append(b->spans, entry);
        Py_XDECREF(entry);
        if (added < 0) {
            Py_DECREF(scope_ref);
            return -1;
        }
    }
    Field f;
    int r;
    while ((r = next_field(&p, end, &f)) > 0)
        if (f.number == 2 && f.type == WT_LEN && read_span(b, res, scope_ref, f.data, f.len) < 0) {
            r = -1;
            break;
        }
    Py_DECREF(scope_ref);
    return r < 0 ? -1 : 0;
}

/* resource_cb's answer: (ref, call_id, service, attrs, ...) */
static int
unpack_resource(PyObject *answer, Resource *res)
{
    if (!PyTuple_Check(answer) || PyTuple_GET_SIZE(answer) < 4) {
        PyErr_SetString(PyExc_TypeError,
                        "resource_cb must return (ref, call_id, service, attributes, ...)");
        return -1;
    }
    res->ref = PyTuple_GET_ITEM(answer, 0);
    res->call_id = PyTuple_GET_ITEM(answer, 1);
    res->service = PyTuple_GET_ITEM(answer, 2);
    res->attrs = PyTuple_GET_ITEM(answer, 3);
    return 0;
}

static PyObject *
build_result(Batch *b, PyObject *extents)
{
    PyObject *traces = PyDict_New(), *attrs = PyDict_New();
    if (traces == NULL || attrs == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < b->traces.count; i++) {
        Trace *t = &b->traces.items[i];
        PyObject *row = Py_BuildValue("[OOOKKKOOO]", t->trace_id, t->call_id, t->service,
                                      (unsigned long long)t->start, (unsigned long long)t->end,
                                      (unsigned long long)(t->end - t->start), t->root_name,
                                      t->root_span_id, t->has_error ? Py_True : Py_False);
        if (row == NULL)
            goto error;
        int r = PyDict_SetItem(traces, t->trace_id, row);
        Py_DECREF(row);
        if (r < 0 || PyDict_SetItem(attrs, t->trace_id, t->attrs) < 0)
            goto error;
    }
    /* N: the result takes over the two dicts made here */
    return Py_BuildValue("(ONNOOO)", b->spans, traces, attrs, b->names, b->call_traces, extents);
error:
    Py_XDECREF(traces);
    Py_XDECREF(attrs);
    return NULL;
}

PyDoc_STRVAR(build_rows_doc,
"build_rows(payload, project, resource_cb, scope_cb, span_rows=True)\n--\n\n"
"The rows of a serialized ExportTraceServiceRequest, as collector.storage.build_rows\n"
"makes them: (spans, traces, trace_attrs, trace_names, call_traces, extents).\n"
"With span_rows false, spans is execute_steps' plan instead of the rows: for each\n"
"ScopeSpans, (offset in payload, length, call_id, resource ref, scope ref).\n"
"resource_cb(resource_bytes) returns (ref, call_id, service, attribute pairs, ...);\n"
"scope_cb(scope_bytes) returns a scope's ref; each is called once for each distinct\n"
"resource or scope, in the order they first appear. extents holds (resource_cb's answer,\n"
"first start, last end) for each run of consecutive ResourceSpans of one resource with\n"
"spans. ValueError if the payload\n"
"is not well-formed protobuf.");

static int
add_extent(PyObject *extents, PyObject *answer, uint64_t start, uint64_t end)
{
    PyObject *extent =
        Py_BuildValue("(OKK)", answer, (unsigned long long)start, (unsigned long long)end);
    int r = extent == NULL ? -1 : PyList_Append(extents, extent);
    Py_XDECREF(extent);
    return r;
}

static PyObject *
build_rows(PyObject *self, PyObject *args)
{
    Py_buffer payload;
    PyObject *project, *resource_cb, *scope_cb;
    int span_rows = 1;
    if (!PyArg_ParseTuple(args, "y*OOO|p:build_rows", &payload, &project, &resource_cb,
                          &scope_cb, &span_rows))
        return NULL;
    Batch b = {project, PyList_New(0), PySet_New(NULL), PySet_New(NULL),
               {NULL, 0, 0, NULL, 0}, payload.buf, span_rows, PyDict_New()};
    PyObject *extents = PyList_New(0), *resource_answers = PyDict_New(), *result = NULL;
    if (b.spans == NULL || b.names == NULL || b.call_traces == NULL ||
        b.scope_refs == NULL || extents == NULL || resource_answers == NULL)
        goto done;
    const uint8_t *p = payload.buf, *end = p + payload.len;
    Field f;
    int r;
    /* Consecutive ResourceSpans of one resource (an agent's spans, exported a few at a
     * time) make one extent, so Python merges them into their call once. */
    PyObject *last = NULL;
    uint64_t last_start = 0, last_end = 0;
    while ((r = next_field(&p, end, &f)) > 0) {
        if (f.number != 1 || f.type != WT_LEN)
            continue;
        const uint8_t *rs = f.data, *rs_end = f.data + f.len, *q = rs;
        PyObject *resource = submessage(rs, rs_end, 1);
        if (resource == NULL)
            goto done;
        PyObject *answer = memo_call(resource_answers, resource_cb, resource);
        Py_DECREF(resource);
        if (answer == NULL)
            goto done;
        Resource res = {0};
        if (unpack_resource(answer, &res) < 0) {
            Py_DECREF(answer);
            goto done;
        }
        Field g;
        int s;
        while ((s = next_field(&q, rs_end, &g)) > 0)
            if (g.number == 2 && g.type == WT_LEN &&
                read_scope_spans(&b, &res, scope_cb, g.data, g.len) < 0) {
                s = -1;
                break;
            }
        if (s == 0 && res.has_spans) {
            if (answer == last) { /* the same resource again: one extent for the run */
                if (res.start_min < last_start)
                    last_start = res.start_min;
                if (res.end_max > last_end)
                    last_end = res.end_max;
            }
            else {
                if (last != NULL && add_extent(extents, last, last_start, last_end) < 0)
                    s = -1;
                last = answer; /* resource_answers holds it */
                last_start = res.start_min;
                last_end = res.end_max;
            }
        }
        Py_DECREF(answer);
        if (s < 0)
            goto done;
    }
    if (r == 0 && last != NULL && add_extent(extents, last, last_start, last_end) < 0)
        goto done;
    if (r == 0)
        result = build_result(&b, extents);
done:
    PyBuffer_Release(&payload);
    Py_XDECREF(b.spans);
    Py_XDECREF(b.names);
    Py_XDECREF(b.call_traces);
    Py_XDECREF(b.scope_refs);
    Py_XDECREF(extents);
    Py_XDECREF(resource_answers);
    traces_free(&b.traces);
    return result;
}

static int
all_zero(const uint8_t *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Whether every span of the ScopeSpans in [p, end) has well-formed ids (see
 * collector.receivers.otlp.drop_invalid_spans) and no all-zero parent; counts them. */
static int
check_scope_spans(const uint8_t *p, const uint8_t *end, Py_ssize_t *count, int *clean)
{
    Field f;
    int r;
    while ((r = next_field(&p, end, &f)) > 0) {
        if (f.number != 2 || f.type != WT_LEN)
            continue;
        SpanFields s;
        if (span_fields(f.data, f.len, &s) < 0)
            return -1;
        (*count)++;
        if (s.trace_id_len != 16 || all_zero(s.trace_id, 16) || s.span_id_len != 8 ||
            all_zero(s.span_id, 8) || (s.parent_len != 0 && (s.parent_len != 8 || all_zero(s.parent, 8))))
            *clean = 0;
    }
    return r;
}

PyDoc_STRVAR(check_spans_doc,
"check_spans(payload)\n--\n\n"
"(spans, clean) of a serialized ExportTraceServiceRequest: how many spans it holds and\n"
"whether all of them have valid ids and none an all-zero parent span id, so that\n"
"drop_invalid_spans has nothing to do. ValueError if it is not well-formed protobuf.");

static PyObject *
check_spans(PyObject *self, PyObject *arg)
{
    Py_buffer payload;
    if (PyObject_GetBuffer(arg, &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = payload.buf, *end = p + payload.len;
    Py_ssize_t count = 0;
    int clean = 1, r;
    Field f, g;
    while ((r = next_field(&p, end, &f)) > 0) {
        if (f.number != 1 || f.type != WT_LEN)
            continue;
        const uint8_t *q = f.data, *qend = f.data + f.len;
        while ((r = next_field(&q, qend, &g)) > 0)
            if (g.number == 2 && g.type == WT_LEN &&
                check_scope_spans(g.data, g.data + g.len, &count, &clean) < 0) {
                r = -1;
                break;
            }
        if (r < 0)
            break;
    }
    PyBuffer_Release(&payload);
    if (r < 0)
        return NULL;
    return Py_BuildValue("(nO)", count, clean ? Py_True : Py_False);
}

/* -- where each ResourceSpans is in a request (collector.spans.serialize_resource_spans) */

PyDoc_STRVAR(resource_spans_layout_doc,
"resource_spans_layout(payload)\n--\n\n"
"For each ResourceSpans of a serialized ExportTraceServiceRequest, in order: (start,\n"
"end, resource start, resource end, spans), the offsets of its fields and of its one\n"
"resource field (tag included), and how many spans it holds; None for one without\n"
"exactly one resource field.");

/* Where one ResourceSpans (the field f of a request starting at base) has its parts. */
typedef struct {
    Py_ssize_t start, end;          /* its fields */
    Py_ssize_t resource, resource_end; /* its resource field, tag included */
    Py_ssize_t resource_data;       /* the resource's bytes: past the tag and length */
    Py_ssize_t resources, spans;    /* how many resource fields, how many spans */
} RsLayout;

static int
rs_layout(const uint8_t *base, const Field *f, RsLayout *out)
{
    const uint8_t *q = f->data, *rs_end = f->data + f->len, *field = q;
    Field g;
    int r;
    *out = (RsLayout){f->data - base, rs_end - base, 0, 0, 0, 0, 0};
    while ((r = next_field(&q, rs_end, &g)) > 0) {
        if (g.number == 1 && g.type == WT_LEN) { /* another type: an unknown field */
            out->resources++;
            out->resource = field - base;
            out->resource_end = q - base;
            out->resource_data = g.data - base;
        }
        else if (g.number == 2 && g.type == WT_LEN) { /* ScopeSpans: count its spans */
            const uint8_t *t = g.data, *ss_end = g.data + g.len;
            Field h;
            while ((r = next_field(&t, ss_end, &h)) > 0)
                if (h.number == 2 && h.type == WT_LEN)
                    out->spans++;
            if (r < 0)
                return -1;
        }
        field = q;
    }
    return r;
}

static PyObject *
resource_spans_layout(PyObject *self, PyObject *arg)
{
    Py_buffer payload;
    if (PyObject_GetBuffer(arg, &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *base = payload.buf, *p = base, *end = base + payload.len;
    PyObject *layout = PyList_New(0);
    Field f;
    int r = layout == NULL ? -1 : 0;
    while (r == 0 && (r = next_field(&p, end, &f)) > 0) {
        r = 0;
        if (f.number != 1 || f.type != WT_LEN)
            continue;
        RsLayout at;
        if (rs_layout(base, &f, &at) < 0) {
            r = -1;
            break;
        }
        PyObject *item;
        if (at.resources == 1)
            item = Py_BuildValue("(nnnnn)", at.start, at.end, at.resource, at.resource_end,
                                 at.spans);
        else
            item = Py_NewRef(Py_None);
        if (item == NULL || PyList_Append(layout, item) < 0)
            r = -1;
        Py_XDECREF(item);
    }
    PyBuffer_Release(&payload);
    if (r < 0) {
        Py_XDECREF(layout);
        return NULL;
    }
    return layout;
}

PyDoc_STRVAR(received_doc,
"received(resource_spans, body)\n--\n\n"
"(SpanBatch.sources, SpanBatch.resource_payloads) of resource_spans, the messages of\n"
"the ExportTraceServiceRequest body was parsed into, in order: what\n"
"collector.spans.received_bytes(request, body, resource_spans_layout(body)) and\n"
"received_resources of that give, in one pass. ValueError if body is malformed or holds\n"
"another number of ResourceSpans.");

static PyObject *
received(PyObject *self, PyObject *args)
{
    PyObject *messages, *body;
    if (!PyArg_ParseTuple(args, "OO!:received", &messages, &PyBytes_Type, &body))
        return NULL;
    PyObject *list = PySequence_Fast(messages, "resource_spans must be iterable");
    if (list == NULL)
        return NULL;
    const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(body), *p = base;
    const uint8_t *end = base + PyBytes_GET_SIZE(body);
    PyObject *sources = PyDict_New(), *payloads = PyDict_New(), *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(list), i = 0;
    Field f;
    int r = sources == NULL || payloads == NULL ? -1 : 0;
    while (r == 0 && (r = next_field(&p, end, &f)) > 0) {
        r = 0;
        if (f.number != 1 || f.type != WT_LEN)
            continue;
        RsLayout at;
        if (rs_layout(base, &f, &at) < 0) {
            set_malformed();
            r = -1;
            break;
        }
        if (i == n) {
            r = -2;
            break;
        }
        PyObject *rs = PySequence_Fast_GET_ITEM(list, i++);
        if (at.resources != 1)
            continue;
        PyObject *key = PyLong_FromVoidPtr(rs); /* id(rs) */
        PyObject *source = Py_BuildValue("(OOnnnnn)", rs, body, at.start, at.end, at.resource,
                                         at.resource_end, at.spans);
        PyObject *resource = PyBytes_FromStringAndSize((const char *)base + at.resource_data,
                                                       at.resource_end - at.resource_data);
        PyObject *known = resource ? PyTuple_Pack(2, rs, resource) : NULL;
        if (key == NULL || source == NULL || known == NULL ||
            PyDict_SetItem(sources, key, source) < 0 || PyDict_SetItem(payloads, key, known) < 0)
            r = -1;
        Py_XDECREF(key);
        Py_XDECREF(source);
        Py_XDECREF(resource);
        Py_XDECREF(known);
    }
    if (r < 0 && r != -2 && !PyErr_Occurred())
        set_malformed();
    if (r == 0 && i != n)
        r = -2;
    if (r == -2)
        PyErr_Format(PyExc_ValueError, "the body holds another number of ResourceSpans than %zd",
                     n);
    else if (r == 0)
        result = PyTuple_Pack(2, sources, payloads);
    Py_XDECREF(sources);
    Py_XDECREF(payloads);
    Py_DECREF(list);
    return result;
}

static int
key_is(const uint8_t *key, Py_ssize_t len, const char *name)
{
    size_t n = strlen(name);
    return (size_t)len == n && memcmp(key, name, n) == 0;
}

/* A str for a fact (str or None if empty and or_none), set in *slot (new reference) */
static int
set_fact(PyObject **slot, const uint8_t *data, Py_ssize_t len, int or_none)
{
    PyObject *value = len == 0 && or_none ? Py_NewRef(Py_None) : utf8(data, len);
    if (value == NULL)
        return -1;
    Py_XSETREF(*slot, value);
    return 0;
}

PyDoc_STRVAR(resource_facts_doc,
"resource_facts(resource_bytes)\n--\n\n"
"What collector.storage._ResourceFacts reads off a serialized Resource, in C: (attrs,\n"
"service, call_id, call_key, call_source, has_tags). attrs: the (key, attribute_text)\n"
"pairs of its indexed attributes but the calltrace.call.* ones, in order, keys and texts\n"
"interned; service: service.name's string or None; call_id: calltrace.call.id's or None;\n"
"call_key, call_source: those attributes' strings or None when absent; has_tags: whether\n"
"a roark.project.tag.* attribute is there (their values are read in Python). For\n"
"duplicate keys the last wins, as in Python. ValueError if malformed.");

static PyObject *
resource_facts(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = view.buf, *end = p + view.len;
    PyObject *attrs = PyList_New(0), *result = NULL;
    PyObject *service = Py_NewRef(Py_None), *call_id = Py_NewRef(Py_None);
    PyObject *call_key = Py_NewRef(Py_None), *call_source = Py_NewRef(Py_None);
    int has_tags = 0, r;
    Field f;
    if (attrs == NULL)
        goto done;
    while ((r = next_field(&p, end, &f)) > 0) {
        if (f.number != 1 || f.type != WT_LEN)
            continue; /* attributes are field 1; dropped_attributes_count and others */
        const uint8_t *key;
        Py_ssize_t key_len;
        int has_value;
        Field kind;
        if (read_key_value(f.data, f.data + f.len, &key, &key_len, &has_value, &kind) < 0)
            goto malformed;
        /* string_value as protobuf reads it: empty unless the oneof holds a string */
        const uint8_t *text = key;
        Py_ssize_t text_len = 0;
        if (kind.number == 1)
            text = kind.data, text_len = kind.len;
        if (key_is(key, key_len, "calltrace.call.id")) {
            if (set_fact(&call_id, text, text_len, 1) < 0)
                goto done;
            continue;
        }
        if (key_is(key, key_len, "calltrace.call.key")) {
            if (set_fact(&call_key, text, text_len, 0) < 0)
                goto done;
            continue;
        }
        if (key_is(key, key_len, "calltrace.call.source")) {
            if (set_fact(&call_source, text, text_len, 0) < 0)
                goto done;
            continue;
        }
        if (key_is(key, key_len, "service.name")) {
            if (set_fact(&service, text, text_len, 1) < 0)
                goto done;
        }
        else if (key_len >= 18 && memcmp(key, "roark.project.tag.", 18) == 0)
            has_tags = 1;
        /* interned: the same keys and most values repeat in every resource */
        PyObject *pair = pair_of(key, key_len, has_value, kind, 1);
        if (pair == NULL)
            goto done;
        if (pair == Py_None) {
            Py_DECREF(pair);
            continue;
        }
        int added = PyList_Append(attrs, pair);
        Py_DECREF(pair);
        if (added < 0)
            goto done;
    }
    if (r < 0)
        goto malformed;
    PyObject *pairs = PyList_AsTuple(attrs);
    if (pairs != NULL)
        result = Py_BuildValue("(NOOOOO)", pairs, service, call_id, call_key, call_source,
                               has_tags ? Py_True : Py_False);
    goto done;
malformed:
    set_malformed();
done:
    Py_XDECREF(attrs);
    Py_DECREF(service);
    Py_DECREF(call_id);
    Py_DECREF(call_key);
    Py_DECREF(call_source);
    PyBuffer_Release(&view);
    return result;
}

/* -- SpanBatch bytes (collector/spans.py serialize_resource_spans) ------------------- */

/* One ResourceSpans' part of the body: its field, either whole (a message serialized
 * now) or made of its resource and the two runs of received bytes around the received
 * resource field. References are held until the body is written. */
typedef struct {
    PyObject *whole;    /* serialized ResourceSpans, or NULL */
    PyObject *resource; /* its resource's bytes (with received) */
    PyObject *received; /* the request body it came in */
    Py_ssize_t start, end, resource_start, resource_end;
} Piece;

static size_t
varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80)
        v >>= 7, n++;
    return n;
}

static char *
write_varint(char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

/* The entry of d for rs's id if it is there for this very message (its first item is
 * rs): borrowed, NULL if not (no exception) or on error (exception set). */
static PyObject *
entry_for(PyObject *d, PyObject *key, PyObject *rs)
{
    if (d == Py_None || !PyDict_Check(d))
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(d, key);
    if (entry == NULL || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) < 2 ||
        PyTuple_GET_ITEM(entry, 0) != rs)
        return NULL;
    return entry;
}

/* message.SerializeToString() as bytes (new reference) */
static PyObject *
serialized(PyObject *message)
{
    PyObject *out = PyObject_CallMethod(message, "SerializeToString", NULL);
    if (out != NULL && !PyBytes_Check(out)) {
        PyObject *copy = PyBytes_FromObject(out);
        Py_SETREF(out, copy);
    }
    return out;
}

static int
piece_from_source(Piece *piece, PyObject *source, PyObject *resource_payloads, PyObject *key,
                  PyObject *rs)
{
    Py_ssize_t offsets[4];
    for (int i = 0; i < 4; i++) {
        offsets[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(source, 2 + i));
        if (offsets[i] == -1 && PyErr_Occurred())
            return -1;
    }
    PyObject *received = PyTuple_GET_ITEM(source, 1);
    Py_ssize_t size = PyBytes_GET_SIZE(received);
    if (!(0 <= offsets[0] && offsets[0] <= offsets[2] && offsets[2] <= offsets[3] &&
          offsets[3] <= offsets[1] && offsets[1] <= size)) {
        PyErr_SetString(PyExc_ValueError, "a source's offsets are outside its body");
        return -1;
    }
    PyObject *known = entry_for(resource_payloads, key, rs);
    PyObject *resource;
    if (known != NULL && PyBytes_Check(PyTuple_GET_ITEM(known, 1)))
        resource = Py_NewRef(PyTuple_GET_ITEM(known, 1));
    else {
        if (PyErr_Occurred())
            return -1;
        PyObject *message = PyObject_GetAttrString(rs, "resource");
        resource = message == NULL ? NULL : serialized(message);
        Py_XDECREF(message);
        if (resource == NULL)
            return -1;
    }
    piece->resource = resource;
    piece->received = Py_NewRef(received);
    piece->start = offsets[0], piece->end = offsets[1];
    piece->resource_start = offsets[2], piece->resource_end = offsets[3];
    return 0;
}

/* The field of a piece: its bytes after the tag and length, and how many */
static Py_ssize_t
piece_size(const Piece *piece)
{
    if (piece->whole != NULL)
        return PyBytes_GET_SIZE(piece->whole);
    Py_ssize_t resource = PyBytes_GET_SIZE(piece->resource);
    return 1 + (Py_ssize_t)varint_size((uint64_t)resource) + resource + piece->end -
           piece->start - (piece->resource_end - piece->resource_start);
}

static char *
write_piece(char *p, const Piece *piece)
{
    Py_ssize_t size = piece_size(piece);
    *p++ = '\n';
    p = write_varint(p, (uint64_t)size);
    if (piece->whole != NULL) {
        memcpy(p, PyBytes_AS_STRING(piece->whole), (size_t)size);
        return p + size;
    }
    Py_ssize_t resource = PyBytes_GET_SIZE(piece->resource);
    const char *received = PyBytes_AS_STRING(piece->received);
    *p++ = '\n';
    p = write_varint(p, (uint64_t)resource);
    memcpy(p, PyBytes_AS_STRING(piece->resource), (size_t)resource);
    p += resource;
    memcpy(p, received + piece->start, (size_t)(piece->resource_start - piece->start));
    p += piece->resource_start - piece->start;
    memcpy(p, received + piece->resource_end, (size_t)(piece->end - piece->resource_end));
    return p + (piece->end - piece->resource_end);
}

PyDoc_STRVAR(serialize_resource_spans_doc,
"serialize_resource_spans(resource_spans, sources, resource_payloads)\n--\n\n"
"collector.spans.serialize_resource_spans in C: the ExportTraceServiceRequest body of\n"
"resource_spans (any iterable), each message copied from its received bytes where sources\n"
"(a dict by id, or None) holds them for that very message, with its resource from\n"
"resource_payloads (likewise) or serialized now; a message without a source (or whose\n"
"body is not a bytes object) is serialized whole. The bytes are copied without the GIL.");

static PyObject *
serialize_resource_spans(PyObject *self, PyObject *args)
{
    PyObject *messages, *sources, *resource_payloads;
    if (!PyArg_ParseTuple(args, "OOO:serialize_resource_spans", &messages, &sources,
                          &resource_payloads))
        return NULL;
    PyObject *list = PySequence_Fast(messages, "resource_spans must be iterable");
    if (list == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(list), total = 0, made = 0;
    Piece *pieces = PyMem_Calloc(n ? (size_t)n : 1, sizeof *pieces);
    PyObject *result = NULL;
    if (pieces == NULL) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    for (; made < n; made++) {
        PyObject *rs = PySequence_Fast_GET_ITEM(list, made);
        Piece *piece = &pieces[made];
        PyObject *key = PyLong_FromVoidPtr(rs); /* id(rs) */
        if (key == NULL)
            goto done;
        PyObject *source = entry_for(sources, key, rs);
        int r;
        if (source != NULL && PyTuple_GET_SIZE(source) >= 6 &&
            PyBytes_Check(PyTuple_GET_ITEM(source, 1)))
            r = piece_from_source(piece, source, resource_payloads, key, rs);
        else if (PyErr_Occurred())
            r = -1;
        else
            r = (piece->whole = serialized(rs)) == NULL ? -1 : 0;
        Py_DECREF(key);
        if (r < 0) {
            made++; /* its references, if any, are released below */
            goto done;
        }
        Py_ssize_t size = piece_size(piece);
        total += 1 + (Py_ssize_t)varint_size((uint64_t)size) + size;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result != NULL) {
        char *p = PyBytes_AS_STRING(result);
        /* the pieces hold what they point into; the new bytes are no one else's yet */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            p = write_piece(p, &pieces[i]);
        Py_END_ALLOW_THREADS
    }
done:
    for (Py_ssize_t i = 0; i < made; i++) {
        Py_XDECREF(pieces[i].whole);
        Py_XDECREF(pieces[i].resource);
        Py_XDECREF(pieces[i].received);
    }
    PyMem_Free(pieces);
    Py_DECREF(list);
    return result;
}

/* -- Redis stream entries (exporters/redis_streams.py) ------------------------------ */

/* A growing byte buffer; raw allocations (PyMem_RawFree it), so that it also grows
 * without the GIL: with nogil set, running out of memory sets no exception. */
typedef struct {
    char *data;
    Py_ssize_t len, cap;
    int nogil;
} Buffer;

static int
buffer_reserve(Buffer *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_RawRealloc(b->data, cap);
    if (data == NULL) {
        if (!b->nogil)
            PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
buffer_add(Buffer *b, const void *data, Py_ssize_t len)
{
    if (buffer_reserve(b, len) < 0)
        return -1;
    memcpy(b->data + b->len, data, (size_t)len);
    b->len += len;
    return 0;
}

/* The decimal digits of v at the end of a 24-byte area ending at end: returns where
 * they start (snprintf is slow for a dozen numbers a span). */
static char *
decimal(char *end, uint64_t v)
{
    char *p = end;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return p;
}

static int
add_decimal(Buffer *b, int64_t v, int is_signed)
{
    char area[24], *end = area + sizeof area;
    uint64_t magnitude = is_signed && v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    char *p = decimal(end, magnitude);
    if (is_signed && v < 0)
        *--p = '-';
    return buffer_add(b, p, end - p);
}

/* One RESP bulk string: $<len>\r\n<data>\r\n */
static int
bulk(Buffer *b, const void *data, Py_ssize_t len)
{
    if (buffer_reserve(b, len + 26) < 0)
        return -1;
    b->data[b->len++] = '$';
    add_decimal(b, len, 0);
    memcpy(b->data + b->len, "\r\n", 2);
    memcpy(b->data + b->len + 2, data, (size_t)len);
    memcpy(b->data + b->len + 2 + len, "\r\n", 2);
    b->len += len + 4;
    return 0;
}

static int
bulk_hex(Buffer *b, const uint8_t *data, Py_ssize_t len)
{
    static const char digits[] = "0123456789abcdef";
    if (buffer_reserve(b, 2 * len + 26) < 0)
        return -1;
    b->data[b->len++] = '$';
    add_decimal(b, 2 * len, 0);
    b->data[b->len++] = '\r';
    b->data[b->len++] = '\n';
    for (Py_ssize_t i = 0; i < len; i++) {
        b->data[b->len++] = digits[data[i] >> 4];
        b->data[b->len++] = digits[data[i] & 15];
    }
    return buffer_add(b, "\r\n", 2);
}

static int
bulk_field(Buffer *b, const char *name, const void *data, Py_ssize_t len)
{
    if (bulk(b, name, (Py_ssize_t)strlen(name)) < 0)
        return -1;
    return bulk(b, data, len);
}

/* A field whose value is a number: the number as a bulk string of its digits. */
static int
bulk_number(Buffer *b, const char *name, int64_t v, int is_signed)
{
    char area[24], *end = area + sizeof area;
    uint64_t magnitude = is_signed && v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    char *p = decimal(end, magnitude);
    if (is_signed && v < 0)
        *--p = '-';
    return bulk_field(b, name, p, end - p);
}

#define OUT_OF_MEMORY (-2)

/* One entry: the span's fields, its resource's fields (tail) and the span's own bytes,
 * as redis_streams._SPAN_RESP, appended to b (no GIL needed): -1 if the span is
 * malformed, OUT_OF_MEMORY. */
static int
pack_entry(Buffer *b, const uint8_t *span, Py_ssize_t span_len, const char *tail,
           Py_ssize_t tail_len)
{
    SpanFields s;
    if (read_span_fields(span, span_len, &s) < 0)
        return -1;
    if (buffer_reserve(b, span_len + tail_len + 320) < 0 ||
        bulk(b, "trace_id", 8) < 0 ||
        bulk_hex(b, s.trace_id, s.trace_id_len) < 0 || bulk(b, "span_id", 7) < 0 ||
        bulk_hex(b, s.span_id, s.span_id_len) < 0 || bulk(b, "parent_span_id", 14) < 0 ||
        bulk_hex(b, s.parent, s.parent_len) < 0 ||
        bulk_field(b, "name", s.name, s.name_len) < 0 ||
        bulk_number(b, "kind", s.kind, 1) < 0 ||
        bulk_number(b, "start_ns", (int64_t)s.start, 0) < 0 ||
        bulk_number(b, "end_ns", (int64_t)s.end, 0) < 0 ||
        bulk_number(b, "status_code", s.status, 1) < 0 ||
        buffer_add(b, tail, tail_len) < 0 || bulk_field(b, "span", span, span_len) < 0)
        return OUT_OF_MEMORY;
    return 0;
}

/* A resource's part of stream_commands: where its ResourceSpans is and what
 * resource_cb answered (borrowed from the answers list). */
typedef struct {
    const uint8_t *rs, *rs_end;
    long arguments;
    const char *tail;
    Py_ssize_t tail_len;
} StreamResource;

/* Appends a command for every span of resources[0..n) to out (no GIL): 0, -1 for a
 * malformed span, OUT_OF_MEMORY. */
static int
pack_commands(Buffer *out, const StreamResource *resources, Py_ssize_t n, long head_arguments,
              const char *head, Py_ssize_t head_len, Py_ssize_t *commands)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const StreamResource *res = &resources[i];
        const uint8_t *q = res->rs;
        Field g, h;
        int s;
        while ((s = scan_field(&q, res->rs_end, &g)) > 0) {
            if (g.number != 2 || g.type != WT_LEN)
                continue;
            const uint8_t *p = g.data, *end = g.data + g.len;
            int t;
            while ((t = scan_field(&p, end, &h)) > 0) {
                if (h.number != 2 || h.type != WT_LEN)
                    continue;
                if (buffer_add(out, "*", 1) < 0 ||
                    add_decimal(out, head_arguments + res->arguments, 1) < 0 ||
                    buffer_add(out, "\r\n", 2) < 0 || buffer_add(out, head, head_len) < 0)
                    return OUT_OF_MEMORY;
                int r = pack_entry(out, h.data, h.len, res->tail, res->tail_len);
                if (r < 0)
                    return r;
                (*commands)++;
            }
            if (t < 0)
                return -1;
        }
        if (s < 0)
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(stream_commands_doc,
"stream_commands(payload, resource_cb, head_arguments, head)\n--\n\n"
"redis_streams' commands for the spans of a serialized ExportTraceServiceRequest, one\n"
"a span, as that exporter packs them in Python: *<head_arguments + the entry's\n"
"arguments>, head (packed), then the entry packed as _SPAN_RESP. resource_cb(resource\n"
"bytes) returns (arguments, tail) for the entries of a resource: how many arguments an\n"
"entry takes and the packed resource fields that follow the span's. It is called once\n"
"for each distinct resource, first, with the GIL; the packing runs without it. Returns\n"
"(packed commands, how many).");

static PyObject *
stream_commands(PyObject *self, PyObject *args)
{
    Py_buffer payload;
    PyObject *resource_cb;
    const char *head;
    Py_ssize_t head_len;
    long head_arguments;
    if (!PyArg_ParseTuple(args, "y*Olz#:stream_commands", &payload, &resource_cb,
                          &head_arguments, &head, &head_len))
        return NULL;
    PyObject *answers = PyList_New(0), *asked = PyDict_New(), *result = NULL;
    StreamResource *resources = NULL;
    Py_ssize_t n = 0, room = 0;
    Buffer out = {NULL, 0, 0, 1};
    const uint8_t *p = payload.buf, *end = p + payload.len;
    Field f;
    int r = answers == NULL || asked == NULL ? -1 : 0;
    while (r == 0 && (r = next_field(&p, end, &f)) > 0) { /* the resources, with the GIL */
        r = 0;
        if (f.number != 1 || f.type != WT_LEN)
            continue;
        PyObject *resource = submessage(f.data, f.data + f.len, 1);
        PyObject *answer = resource ? memo_call(asked, resource_cb, resource) : NULL;
        Py_XDECREF(resource);
        PyObject *count, *tail;
        if (answer == NULL || PyList_Append(answers, answer) < 0 ||
            !PyArg_ParseTuple(answer, "OS:resource_cb's answer", &count, &tail)) {
            Py_XDECREF(answer);
            r = -1;
            break;
        }
        Py_DECREF(answer); /* the answers list keeps it */
        if (n == room) {
            room = room ? 2 * room : 64;
            StreamResource *grown = PyMem_Realloc(resources, room * sizeof *resources);
            if (grown == NULL) {
                PyErr_NoMemory();
                r = -1;
                break;
            }
            resources = grown;
        }
        StreamResource *res = &resources[n++];
        res->rs = f.data, res->rs_end = f.data + f.len;
        res->arguments = PyLong_AsLong(count);
        if (res->arguments == -1 && PyErr_Occurred()) {
            r = -1;
            break;
        }
        res->tail = PyBytes_AS_STRING(tail), res->tail_len = PyBytes_GET_SIZE(tail);
    }
    if (r == 0) {
        Py_ssize_t commands = 0;
        int packed;
        Py_BEGIN_ALLOW_THREADS
        packed = pack_commands(&out, resources, n, head_arguments, head, head_len, &commands);
        Py_END_ALLOW_THREADS
        if (packed == OUT_OF_MEMORY)
            PyErr_NoMemory();
        else if (packed < 0)
            set_malformed();
        else
            result = Py_BuildValue("(y#n)", out.data ? out.data : "", out.len, commands);
    }
    PyMem_RawFree(out.data);
    PyMem_Free(resources);
    Py_XDECREF(answers);
    Py_XDECREF(asked);
    PyBuffer_Release(&payload);
    return result;
}

PyDoc_STRVAR(count_replies_doc,
"count_replies(buffer, wanted)\n--\n\n"
"Count up to wanted complete RESP2 replies of XADD at the start of buffer: bulk strings\n"
"($<n>, $-1), errors (-), statuses (+) and integers (:). Returns (bytes they take, how\n"
"many, the first error's message as bytes or None), as redis_streams._ReplyCounter's\n"
"Python loop; ValueError names an unexpected reply.");

static PyObject *
count_replies(PyObject *self, PyObject *args)
{
    Py_buffer buffer;
    Py_ssize_t wanted;
    if (!PyArg_ParseTuple(args, "y*n:count_replies", &buffer, &wanted))
        return NULL;
    const char *data = buffer.buf;
    Py_ssize_t size = buffer.len, position = 0, counted = 0;
    const char *error = NULL;
    Py_ssize_t error_len = 0;
    PyObject *result = NULL;
    while (counted < wanted && position < size) {
        const char *line = memchr(data + position, '\r', (size_t)(size - position));
        /* a reply's first line ends at \r\n; its type byte says what follows */
        while (line != NULL && (line + 1 >= data + size || line[1] != '\n'))
            line = line + 1 >= data + size
                       ? NULL
                       : memchr(line + 1, '\r', (size_t)(data + size - line - 1));
        if (line == NULL)
            break;
        Py_ssize_t line_end = line - data, after = line_end + 2;
        char kind = data[position];
        if (kind == '$') {
            int64_t length = 0, sign = 1;
            Py_ssize_t i = position + 1;
            if (i < line_end && data[i] == '-')
                sign = -1, i++;
            if (i == line_end)
                goto unexpected;
            for (; i < line_end; i++) {
                if (data[i] < '0' || data[i] > '9' || length > (INT64_MAX - 9) / 10)
                    goto unexpected;
                length = length * 10 + (data[i] - '0');
            }
            if (sign > 0) {
                if (length > size - after - 2)
                    break; /* the string is not all here yet */
                after += (Py_ssize_t)length + 2;
            }
        }
        else if (kind == '-') {
            if (error == NULL)
                error = data + position + 1, error_len = line_end - position - 1;
        }
        else if (kind != '+' && kind != ':')
            goto unexpected;
        position = after;
        counted++;
    }
    if (error != NULL)
        result = Py_BuildValue("(nny#)", position, counted, error, error_len);
    else
        result = Py_BuildValue("(nnO)", position, counted, Py_None);
    PyBuffer_Release(&buffer);
    return result;
unexpected:;
    PyObject *reply = PyBytes_FromStringAndSize(data + position,
                                                (size - position) < 64 ? (size - position) : 64);
    if (reply != NULL) {
        PyErr_Format(PyExc_ValueError, "unexpected reply from Redis: %R", reply);
        Py_DECREF(reply);
    }
    PyBuffer_Release(&buffer);
    return NULL;
}

/* -- OTLP/JSON to the protobuf wire format (collector/otlp_json.py) ----------------- */

/* Field kinds of the tables otlp_json._native_table builds from the descriptors. */
enum {
    K_MESSAGE = 1, K_STRING, K_BOOL, K_ENUM, K_DOUBLE, K_FLOAT, K_INT32, K_INT64, K_UINT32,
    K_UINT64, K_SINT32, K_SINT64, K_FIXED32, K_SFIXED32, K_FIXED64, K_SFIXED64, K_HEX_ID,
};
#define JSON_MAX_DEPTH 64
#define FALLBACK 1 /* not an error: a case left to the Python encoder (see json_to_wire) */

static int
put_varint(Buffer *b, uint64_t v)
{
    if (buffer_reserve(b, 10) < 0)
        return -1;
    while (v >= 0x80) {
        b->data[b->len++] = (char)(v | 0x80);
        v >>= 7;
    }
    b->data[b->len++] = (char)v;
    return 0;
}

static int
hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int encode_json_message(Buffer *b, PyObject *obj, PyObject *table, int depth);

/* An integer of a JSON number or decimal string, as int(); FALLBACK for anything else
 * (floats, "1e3", out of the C range), which the Python encoder decides. */
static int
json_integer(PyObject *value, int is_unsigned, long long *out_signed, unsigned long long *out)
{
    PyObject *number;
    if (PyLong_CheckExact(value))
        number = Py_NewRef(value);
    else if (PyUnicode_CheckExact(value)) {
        number = PyLong_FromUnicodeObject(value, 10);
        if (number == NULL) {
            PyErr_Clear();
            return FALLBACK;
        }
    }
    else
        return FALLBACK;
    int r = 0;
    if (is_unsigned) {
        *out = PyLong_AsUnsignedLongLong(number);
        if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            r = FALLBACK;
        }
    }
    else {
        int overflow;
        *out_signed = PyLong_AsLongLongAndOverflow(number, &overflow);
        if (overflow || (*out_signed == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            r = FALLBACK;
        }
    }
    Py_DECREF(number);
    return r;
}

/* One value of a field of ``kind`` (its tag already written). 0, FALLBACK or -1. */
static int
encode_json_value(Buffer *b, int kind, PyObject *value, PyObject *sub, int depth)
{
    switch (kind) {
    case K_MESSAGE: {
        if (!PyDict_CheckExact(value) || depth >= JSON_MAX_DEPTH)
            return FALLBACK;
        /* The length goes before the body, which is written first: one byte is kept
         * for it, and the body moved along if the length needs more. */
        if (buffer_reserve(b, 1) < 0)
            return -1;
        Py_ssize_t at = b->len++;
        int r = encode_json_message(b, value, sub, depth + 1);
        if (r != 0)
            return r;
        Py_ssize_t size = b->len - at - 1;
        char length[10];
        int n = 0;
        for (uint64_t v = (uint64_t)size; ; v >>= 7) {
            length[n++] = (char)(v >= 0x80 ? (v | 0x80) : v);
            if (v < 0x80)
                break;
        }
        if (n > 1) {
            if (buffer_reserve(b, n - 1) < 0)
                return -1;
            memmove(b->data + at + n, b->data + at + 1, (size_t)size);
            b->len += n - 1;
        }
        memcpy(b->data + at, length, (size_t)n);
        return 0;
    }
    case K_STRING: {
        if (!PyUnicode_CheckExact(value))
            return FALLBACK;
        Py_ssize_t len;
        const char *text = PyUnicode_AsUTF8AndSize(value, &len);
        if (text == NULL) { /* a lone surrogate: the Python encoder says which string */
            PyErr_Clear();
            return FALLBACK;
        }
        if (put_varint(b, (uint64_t)len) < 0 || buffer_add(b, text, len) < 0)
            return -1;
        return 0;
    }
    case K_HEX_ID: {
        if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value))
            return FALLBACK;
        Py_ssize_t len = PyUnicode_GET_LENGTH(value);
        const char *text = (const char *)PyUnicode_1BYTE_DATA(value);
        if (len % 2)
            return FALLBACK; /* not an id: INVALID_HEX_ID, which the Python encoder writes */
        if (put_varint(b, (uint64_t)(len / 2)) < 0 || buffer_reserve(b, len / 2) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < len; i += 2) {
            int hi = hex_value(text[i]), lo = hex_value(text[i + 1]);
            if (hi < 0 || lo < 0)
                return FALLBACK; /* (whitespace too, which bytes.fromhex takes) */
            b->data[b->len++] = (char)(hi << 4 | lo);
        }
        return 0;
    }
    case K_BOOL:
        if (value != Py_True && value != Py_False)
            return FALLBACK;
        return put_varint(b, value == Py_True);
    case K_DOUBLE:
    case K_FLOAT: {
        double x;
        if (PyFloat_CheckExact(value))
            x = PyFloat_AS_DOUBLE(value);
        else if (PyLong_CheckExact(value)) {
            x = PyLong_AsDouble(value);
            if (x == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                return FALLBACK;
            }
        }
        else
            return FALLBACK; /* "NaN", "1.5" and the like */
        if (kind == K_DOUBLE)
            return buffer_add(b, &x, 8);
        if (isfinite(x) && (x > 3.4028234663852886e38 || x < -3.4028234663852886e38))
            return FALLBACK; /* too large for a float: an error the Python encoder words */
        float f = (float)x;
        return buffer_add(b, &f, 4);
    }
    default: {
        if (kind != K_ENUM && (kind < K_INT32 || kind > K_SFIXED64))
            return FALLBACK; /* bytes (base64) */
        long long s = 0;
        unsigned long long u = 0;
        int is_unsigned = kind == K_UINT32 || kind == K_UINT64 || kind == K_FIXED32 ||
                          kind == K_FIXED64;
        if (kind == K_ENUM && !PyLong_CheckExact(value))
            return FALLBACK; /* enum names */
        int r = json_integer(value, is_unsigned, &s, &u);
        if (r != 0)
            return r;
        switch (kind) {
        case K_ENUM:
        case K_INT32:
            if (s < INT32_MIN || s > INT32_MAX)
                return FALLBACK;
            return put_varint(b, (uint64_t)s);
        case K_INT64:
            return put_varint(b, (uint64_t)s);
        case K_UINT32:
            if (u > UINT32_MAX)
                return FALLBACK;
            return put_varint(b, u);
        case K_UINT64:
            return put_varint(b, u);
        case K_SINT32:
            if (s < INT32_MIN || s > INT32_MAX)
                return FALLBACK;
            return put_varint(b, ((uint64_t)s << 1) ^ (uint64_t)(s >> 63));
        case K_SINT64:
            return put_varint(b, ((uint64_t)s << 1) ^ (uint64_t)(s >> 63));
        case K_FIXED32: {
            if (u > UINT32_MAX)
                return FALLBACK;
            uint32_t v = (uint32_t)u;
            return buffer_add(b, &v, 4);
        }
        case K_SFIXED32: {
            if (s < INT32_MIN || s > INT32_MAX)
                return FALLBACK;
            int32_t v = (int32_t)s;
            return buffer_add(b, &v, 4);
        }
        case K_FIXED64:
            return buffer_add(b, &u, 8);
        case K_SFIXED64:
            return buffer_add(b, &s, 8);
        }
        return FALLBACK;
    }
    }
}

/* The fields of a JSON object, in its key order, by the table of its message type:
 * key -> (tag bytes, kind, repeated, sub-table or None). */
static int
encode_json_message(Buffer *b, PyObject *obj, PyObject *table, int depth)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(obj, &pos, &key, &value)) {
        if (value == Py_None)
            continue; /* null means the default */
        PyObject *entry = PyDict_GetItemWithError(table, key);
        if (entry == NULL) {
            if (PyErr_Occurred())
                return -1;
            continue; /* unknown fields are ignored */
        }
        PyObject *tag = PyTuple_GET_ITEM(entry, 0), *sub = PyTuple_GET_ITEM(entry, 3);
        int kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
        int repeated = PyTuple_GET_ITEM(entry, 2) == Py_True;
        if (!repeated) {
            if (buffer_add(b, PyBytes_AS_STRING(tag), PyBytes_GET_SIZE(tag)) < 0)
                return -1;
            int r = encode_json_value(b, kind, value, sub, depth);
            if (r != 0)
                return r;
            continue;
        }
        if (!PyList_CheckExact(value))
            return FALLBACK;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
            if (buffer_add(b, PyBytes_AS_STRING(tag), PyBytes_GET_SIZE(tag)) < 0)
                return -1;
            int r = encode_json_value(b, kind, PyList_GET_ITEM(value, i), sub, depth);
            if (r != 0)
                return r;
        }
    }
    return 0;
}

PyDoc_STRVAR(json_to_wire_doc,
"json_to_wire(document, table)\n--\n\n"
"The protobuf wire format of a parsed OTLP/JSON document (dicts, lists, scalars) by the\n"
"field table of its message type (collector.otlp_json._native_table), the same bytes\n"
"the Python encoder writes; None where that encoder must decide: a value of another\n"
"type than the field's common one (enum names, numbers as strings, base64 bytes, hex\n"
"ids that are not hex) and every error, which it then reports with its JSON path.");

static PyObject *
json_to_wire(PyObject *self, PyObject *args)
{
    PyObject *document, *table;
    if (!PyArg_ParseTuple(args, "O!O!:json_to_wire", &PyDict_Type, &document, &PyDict_Type,
                          &table))
        return NULL;
    Buffer b = {0};
    int r = encode_json_message(&b, document, table, 0);
    PyObject *result = NULL;
    if (r == 0)
        result = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
    else if (r == FALLBACK)
        result = Py_NewRef(Py_None);
    PyMem_RawFree(b.data);
    return result;
}

/* -- a batch's writes straight into SQLite ----------------------------------------------
 *
 * executemany binds each row's values from Python objects (for span rows, objects that
 * build_rows made first, holding the GIL, which the event loop waits for),
 * and lets go of the GIL around every row's step: each time, taking it back waits for
 * the event loop's turn to end. Here the rows go into SQLite in C, span rows from the
 * payload itself, with the GIL let go of once a batch, on a handle of the writer's own
 * (SQLiteHandle: sqlite3_open_v2 on the file; WAL lets it beside Python's connections).
 * SQLite's functions are looked up in the library Python's own sqlite3 module is linked
 * to (load_sqlite): one copy of SQLite in the process, whose POSIX file locks then know
 * of every connection to a file (two copies would each drop the other's locks). Nothing
 * of Python's sqlite3 objects is read, and nothing is linked at build time; without
 * SQLite's functions storage takes the executemany path. */

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
#define SQLITE_OK 0
#define SQLITE_ROW 100
#define SQLITE_DONE 101
#define SQLITE_STATIC ((void (*)(void *))0)

static struct {
    int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
    int (*bind_blob)(sqlite3_stmt *, int, const void *, int, void (*)(void *));
    int (*bind_text)(sqlite3_stmt *, int, const char *, int, void (*)(void *));
    int (*bind_int64)(sqlite3_stmt *, int, int64_t);
    int (*bind_double)(sqlite3_stmt *, int, double);
    int (*bind_null)(sqlite3_stmt *, int);
    int (*step)(sqlite3_stmt *);
    int (*reset)(sqlite3_stmt *);
    int (*finalize)(sqlite3_stmt *);
    int (*changes)(sqlite3 *);
    int64_t (*column_int64)(sqlite3_stmt *, int);
    int (*errcode)(sqlite3 *);
    const char *(*errmsg)(sqlite3 *);
    int (*get_autocommit)(sqlite3 *);
    const char *(*db_filename)(sqlite3 *, const char *);
    int (*open_v2)(const char *, sqlite3 **, int, const char *);
    int (*close)(sqlite3 *);
} sq;
static int sqlite_loaded;

#include <dlfcn.h>

PyDoc_STRVAR(load_sqlite_doc,
"load_sqlite(module_file)\n--\n\n"
"Look up SQLite's functions in the library that the extension module at module_file\n"
"(_sqlite3's __file__, already loaded) is linked to; True if all were found (SQLiteHandle,\n"
"execute_steps and execute_rows work). False for a file not loaded or without them.");

static PyObject *
load_sqlite(PyObject *self, PyObject *arg)
{
    const char *file = PyUnicode_AsUTF8(arg);
    if (file == NULL)
        return NULL;
    /* RTLD_NOLOAD: the module Python loaded, never a second copy */
    void *handle = dlopen(file, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL)
        Py_RETURN_FALSE;
    struct {
        void **slot;
        const char *name;
    } symbols[] = {
        {(void **)&sq.prepare_v2, "sqlite3_prepare_v2"},
        {(void **)&sq.bind_blob, "sqlite3_bind_blob"},
        {(void **)&sq.bind_text, "sqlite3_bind_text"},
        {(void **)&sq.bind_int64, "sqlite3_bind_int64"},
        {(void **)&sq.bind_double, "sqlite3_bind_double"},
        {(void **)&sq.bind_null, "sqlite3_bind_null"},
        {(void **)&sq.step, "sqlite3_step"},
        {(void **)&sq.reset, "sqlite3_reset"},
        {(void **)&sq.finalize, "sqlite3_finalize"},
        {(void **)&sq.changes, "sqlite3_changes"},
        {(void **)&sq.column_int64, "sqlite3_column_int64"},
        {(void **)&sq.errcode, "sqlite3_extended_errcode"},
        {(void **)&sq.errmsg, "sqlite3_errmsg"},
        {(void **)&sq.get_autocommit, "sqlite3_get_autocommit"},
        {(void **)&sq.db_filename, "sqlite3_db_filename"},
        {(void **)&sq.open_v2, "sqlite3_open_v2"},
        {(void **)&sq.close, "sqlite3_close"},
    };
    /* Into a copy first: a library without them leaves what an earlier call found. */
    void *found[sizeof symbols / sizeof symbols[0]];
    int all = 1;
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++)
        if ((found[i] = dlsym(handle, symbols[i].name)) == NULL)
            all = 0;
    if (all && !sqlite_loaded) {
        for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++)
            *symbols[i].slot = found[i];
        sqlite_loaded = 1;
    }
    dlclose(handle); /* the module stays loaded: Python holds it */
    return PyBool_FromLong(all);
}

#define SQLITE_OPEN_READWRITE 0x00000002
#define SQLITE_OPEN_NOMUTEX 0x00008000

/* A SQLite connection of the extension's own: the writer's transactions run on it. */
typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    int busy; /* a call runs on it without the GIL: closing it now is refused */
    PyObject *filename;
} SQLiteHandle;

static PyTypeObject SQLiteHandleType;

static int
handle_init(SQLiteHandle *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"filename", NULL};
    PyObject *filename;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U:SQLiteHandle", kwlist, &filename))
        return -1;
    if (!sqlite_loaded) {
        PyErr_SetString(PyExc_RuntimeError, "load_sqlite() found no SQLite library");
        return -1;
    }
    if (self->db != NULL || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the handle is open already");
        return -1;
    }
    const char *path = PyUnicode_AsUTF8(filename);
    if (path == NULL)
        return -1;
    if (path[0] == '\0' || strcmp(path, ":memory:") == 0) {
        /* SQLite would open a database of the handle's own, not the caller's */
        PyErr_SetString(PyExc_ValueError, "a handle is opened on a file");
        return -1;
    }
    sqlite3 *db = NULL;
    int rc;
    /* An existing file only, read-write: Python's connection made it and its schema. The
     * handle is used by one thread at a time (busy), as Python's connections are. */
    Py_BEGIN_ALLOW_THREADS
    rc = sq.open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        PyErr_Format(PyExc_OSError, "cannot open %s: %s (%d)", path,
                     db == NULL ? "out of memory" : sq.errmsg(db), rc);
        if (db != NULL)
            sq.close(db);
        return -1;
    }
    self->db = db;
    Py_XSETREF(self->filename, Py_NewRef(filename));
    return 0;
}

static PyObject *
handle_close(SQLiteHandle *self, PyObject *unused)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the handle is in use");
        return NULL;
    }
    if (self->db != NULL) {
        sqlite3 *db = self->db;
        self->db = NULL;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = sq.close(db); /* every statement is finalized by the call that made it */
        Py_END_ALLOW_THREADS
        (void)rc;
    }
    Py_RETURN_NONE;
}

static void
handle_dealloc(SQLiteHandle *self)
{
    if (self->db != NULL)
        sq.close(self->db);
    Py_XDECREF(self->filename);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
handle_in_transaction(SQLiteHandle *self, void *closure)
{
    if (self->db == NULL)
        Py_RETURN_FALSE;
    return PyBool_FromLong(!sq.get_autocommit(self->db));
}

static PyObject *
handle_filename(SQLiteHandle *self, void *closure)
{
    return Py_NewRef(self->filename ? self->filename : Py_None);
}

static PyMethodDef handle_methods[] = {
    {"close", (PyCFunction)handle_close, METH_NOARGS,
     "close()\n--\n\nClose the connection (again: nothing). RuntimeError while a call runs on it."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef handle_getset[] = {
    {"in_transaction", (getter)handle_in_transaction, NULL,
     "Whether a transaction is open on it.", NULL},
    {"filename", (getter)handle_filename, NULL, "The file it was opened on.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(handle_doc,
"SQLiteHandle(filename)\n--\n\n"
"A read-write SQLite connection to the existing file filename, opened with\n"
"sqlite3_open_v2 through the library load_sqlite found, for execute_rows and\n"
"execute_steps. Its settings (PRAGMAs) are the caller's to run. OSError if SQLite\n"
"cannot open the file, RuntimeError without load_sqlite. One thread at a time.");

static PyTypeObject SQLiteHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "collector._wire.SQLiteHandle",
    .tp_basicsize = sizeof(SQLiteHandle),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = handle_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)handle_init,
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_methods = handle_methods,
    .tp_getset = handle_getset,
};

/* The open SQLite connection of handle, an SQLiteHandle (its type checked), marked busy
 * for the call (handle_release after); NULL with an exception set if not usable. */
static sqlite3 *
handle_acquire(PyObject *handle)
{
    if (!PyObject_TypeCheck(handle, &SQLiteHandleType)) {
        PyErr_Format(PyExc_TypeError, "expected an SQLiteHandle, not %.100s",
                     Py_TYPE(handle)->tp_name);
        return NULL;
    }
    SQLiteHandle *h = (SQLiteHandle *)handle;
    if (h->db == NULL) {
        PyErr_SetString(PyExc_ValueError, "the handle is closed");
        return NULL;
    }
    if (h->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the handle is in use by another call");
        return NULL;
    }
    h->busy = 1;
    return h->db;
}

static void
handle_release(PyObject *handle)
{
    ((SQLiteHandle *)handle)->busy = 0;
}

typedef struct {
    Py_ssize_t offset, len;
    const char *call_id;
    Py_ssize_t call_id_len;
    int64_t resource, scope;
} PlanEntry;

enum { INSERT_OK, INSERT_SQLITE, INSERT_MALFORMED, INSERT_OVERFLOW };

/* The C values of an insert plan (build_rows(..., span_rows=False)'s spans), read with
 * the GIL; NULL with an exception set if an entry is not well-formed. PyMem_Free it. */
static PlanEntry *
plan_entries(PyObject *plan, Py_ssize_t payload_len)
{
    Py_ssize_t n = PyList_GET_SIZE(plan);
    PlanEntry *entries = PyMem_Calloc(n ? n : 1, sizeof *entries);
    if (entries == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(plan, i);
        PlanEntry *e = &entries[i];
        PyObject *call_id;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5) {
            PyErr_SetString(PyExc_TypeError, "a plan entry is (offset, length, call_id, "
                                             "resource ref, scope ref)");
            goto error;
        }
        e->offset = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 0));
        e->len = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        call_id = PyTuple_GET_ITEM(item, 2);
        e->resource = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 3));
        e->scope = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 4));
        if (PyErr_Occurred())
            goto error;
        if (e->offset < 0 || e->len < 0 || e->offset > payload_len ||
            e->len > payload_len - e->offset) {
            PyErr_SetString(PyExc_ValueError, "a plan entry lies outside the payload");
            goto error;
        }
        if (call_id != Py_None) {
            e->call_id = PyUnicode_AsUTF8AndSize(call_id, &e->call_id_len);
            if (e->call_id == NULL)
                goto error;
        }
    }
    return entries;
error:
    PyMem_Free(entries);
    return NULL;
}

/* A batch's trace ids -> their traces.seq, for a spans step whose statement takes the
 * seq as ?15: read from a dict with the GIL, looked up for every span without it
 * (instead of a subquery on the traces index for each span). Open addressing over the
 * id's hash; the ids point into the dict's keys, which the steps keep alive. */
typedef struct {
    const char *id; /* NULL: an empty slot */
    Py_ssize_t len;
    int64_t seq;
} SeqSlot;

typedef struct {
    SeqSlot *slots; /* NULL: no table (the statement finds the seq itself) */
    size_t mask;
} SeqTable;

static int
seq_table_read(PyObject *seqs, SeqTable *table)
{
    if (!PyDict_Check(seqs)) {
        PyErr_SetString(PyExc_TypeError, "seqs are a dict of trace id -> seq");
        return -1;
    }
    size_t size = 8;
    while (size < (size_t)PyDict_GET_SIZE(seqs) * 2)
        size <<= 1;
    table->slots = PyMem_Calloc(size, sizeof *table->slots);
    if (table->slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    table->mask = size - 1;
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (PyDict_Next(seqs, &position, &key, &value)) {
        char *id;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(key, &id, &len) < 0)
            return -1;
        int64_t seq = PyLong_AsLongLong(value);
        if (seq == -1 && PyErr_Occurred())
            return -1;
        size_t i = hash_bytes((const uint8_t *)id, len) & table->mask;
        while (table->slots[i].id != NULL)
            i = (i + 1) & table->mask;
        table->slots[i] = (SeqSlot){id, len, seq};
    }
    return 0;
}

static const SeqSlot *
seq_lookup(const SeqTable *table, const uint8_t *id, Py_ssize_t len)
{
    for (size_t i = hash_bytes(id, len) & table->mask;; i = (i + 1) & table->mask) {
        const SeqSlot *slot = &table->slots[i];
        if (slot->id == NULL)
            return NULL;
        if (slot->len == len && memcmp(slot->id, id, (size_t)len) == 0)
            return slot;
    }
}

static int
insert_scope_spans(sqlite3_stmt *stmt, const uint8_t *payload, const PlanEntry *e,
                   const char *project, Py_ssize_t project_len, const SeqTable *seqs,
                   long *inserted, sqlite3 *db)
{
    const uint8_t *p = payload + e->offset, *end = p + e->len;
    Field f;
    int r;
    while ((r = scan_field(&p, end, &f)) > 0) {
        if (f.number != 2 || f.type != WT_LEN)
            continue;
        SpanFields s;
        if (read_span_fields(f.data, f.len, &s) < 0)
            return INSERT_MALFORMED;
        uint64_t start = stored_ns(s.start), stop = stored_ns(s.end);
        if (stop < start)
            stop = start; /* as build_rows: no negative durations */
        sq.bind_text(stmt, 1, project, (int)project_len, SQLITE_STATIC);
        sq.bind_blob(stmt, 2, s.trace_id, (int)s.trace_id_len, SQLITE_STATIC);
        sq.bind_blob(stmt, 3, s.span_id, (int)s.span_id_len, SQLITE_STATIC);
        if (s.parent_len)
            sq.bind_blob(stmt, 4, s.parent, (int)s.parent_len, SQLITE_STATIC);
        else
            sq.bind_null(stmt, 4);
        sq.bind_text(stmt, 5, (const char *)s.name, (int)s.name_len, SQLITE_STATIC);
        sq.bind_int64(stmt, 6, s.kind);
        sq.bind_int64(stmt, 7, (int64_t)start);
        sq.bind_int64(stmt, 8, (int64_t)stop);
        sq.bind_int64(stmt, 9, (int64_t)(stop - start));
        sq.bind_int64(stmt, 10, s.status);
        if (e->call_id)
            sq.bind_text(stmt, 11, e->call_id, (int)e->call_id_len, SQLITE_STATIC);
        else
            sq.bind_null(stmt, 11);
        sq.bind_int64(stmt, 12, e->resource);
        sq.bind_int64(stmt, 13, e->scope);
        sq.bind_blob(stmt, 14, f.data, (int)f.len, SQLITE_STATIC);
        if (seqs->slots != NULL) {
            const SeqSlot *found = seq_lookup(seqs, s.trace_id, s.trace_id_len);
            if (found != NULL) /* else NULL: the NOT NULL constraint reports it */
                sq.bind_int64(stmt, 15, found->seq);
            else
                sq.bind_null(stmt, 15);
        }
        int rc = sq.step(stmt);
        sq.reset(stmt);
        if (rc != SQLITE_DONE)
            return INSERT_SQLITE;
        *inserted += sq.changes(db);
    }
    return r < 0 ? INSERT_MALFORMED : INSERT_OK;
}

/* One parameter of execute_rows, converted with the GIL held; strings and bytes point
 * into the Python objects, which the rows list keeps alive. */
typedef struct {
    enum { V_NULL, V_INT, V_FLOAT, V_TEXT, V_BLOB } type;
    int64_t i;
    double d;
    const char *p;
    Py_ssize_t n;
} Value;

static int
to_value(PyObject *o, Value *v)
{
    if (o == Py_None)
        v->type = V_NULL;
    else if (PyLong_Check(o)) { /* bool included, as sqlite3 binds it */
        int overflow;
        v->i = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError,
                            "Python int too large to convert to SQLite INTEGER");
            return -1;
        }
        if (v->i == -1 && PyErr_Occurred())
            return -1;
        v->type = V_INT;
    }
    else if (PyFloat_Check(o))
        v->type = V_FLOAT, v->d = PyFloat_AS_DOUBLE(o);
    else if (PyUnicode_Check(o)) {
        v->p = PyUnicode_AsUTF8AndSize(o, &v->n);
        if (v->p == NULL)
            return -1;
        v->type = V_TEXT;
    }
    else if (PyBytes_Check(o))
        v->type = V_BLOB, v->p = PyBytes_AS_STRING(o), v->n = PyBytes_GET_SIZE(o);
    else {
        PyErr_Format(PyExc_TypeError, "type '%.100s' is not supported", Py_TYPE(o)->tp_name);
        return -1;
    }
    if ((v->type == V_TEXT || v->type == V_BLOB) && v->n > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "string or blob too big");
        return -1;
    }
    return 0;
}

/* Bind one row's values to parameters 1..width (no GIL needed). */
static void
bind_values(sqlite3_stmt *stmt, const Value *values, Py_ssize_t width)
{
    for (Py_ssize_t c = 0; c < width; c++) {
        const Value *v = &values[c];
        int k = (int)c + 1;
        switch (v->type) {
        case V_NULL:
            sq.bind_null(stmt, k);
            break;
        case V_INT:
            sq.bind_int64(stmt, k, v->i);
            break;
        case V_FLOAT:
            sq.bind_double(stmt, k, v->d);
            break;
        case V_TEXT:
            sq.bind_text(stmt, k, v->p, (int)v->n, SQLITE_STATIC);
            break;
        case V_BLOB:
            sq.bind_blob(stmt, k, v->p, (int)v->n, SQLITE_STATIC);
            break;
        }
    }
}

/* The C values of rows (a list of tuples or lists, each as long as the first), read
 * with the GIL into *values (PyMem_Free it), *width each. Stops at the first row that
 * cannot be read, with the exception set: *readable is how many rows were read. */
static int
read_rows(PyObject *rows, Value **values, Py_ssize_t *width, Py_ssize_t *readable)
{
    Py_ssize_t n = PyList_GET_SIZE(rows);
    *values = NULL, *width = 0, *readable = 0;
    if (n > 0) {
        PyObject *first = PyList_GET_ITEM(rows, 0);
        if (!PyTuple_Check(first) && !PyList_Check(first)) {
            PyErr_SetString(PyExc_TypeError, "a row is a tuple or a list");
            return -1;
        }
        *width = PySequence_Fast_GET_SIZE(first);
    }
    *values = PyMem_Calloc(n * *width + 1, sizeof **values);
    if (*values == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t r = 0; r < n; r++, (*readable)++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if ((!PyTuple_Check(row) && !PyList_Check(row)) || PySequence_Fast_GET_SIZE(row) != *width) {
            PyErr_SetString(PyExc_ValueError, "every row has as many values as the first");
            return -1;
        }
        PyObject **items = PySequence_Fast_ITEMS(row);
        for (Py_ssize_t c = 0; c < *width; c++)
            if (to_value(items[c], &(*values)[r * *width + c]) < 0)
                return -1;
    }
    return 0;
}

#define NO_MEMORY (-1) /* not a SQLite code: the RETURNING ids did not fit in memory */

/* The integers a statement returned (RETURNING id), collected without the GIL. */
typedef struct {
    int64_t *ids;
    Py_ssize_t len, room;
} Returned;

/* Run stmt for each of n rows of width values (no GIL): SQLITE_OK, the error SQLite
 * reported, or NO_MEMORY. Rows it returns are read into returned, if given. */
static int
run_rows(sqlite3 *db, sqlite3_stmt *stmt, const Value *values, Py_ssize_t n,
         Py_ssize_t width, Returned *returned, long *changed)
{
    for (Py_ssize_t r = 0; r < n; r++) {
        if (width)
            bind_values(stmt, &values[r * width], width);
        int stepped;
        while ((stepped = sq.step(stmt)) == SQLITE_ROW) { /* RETURNING rows */
            if (returned == NULL)
                continue;
            if (returned->len == returned->room) {
                Py_ssize_t room = returned->room ? 2 * returned->room : 64;
                int64_t *grown = realloc(returned->ids, room * sizeof *grown); /* no GIL */
                if (grown == NULL) {
                    sq.reset(stmt);
                    return NO_MEMORY;
                }
                returned->ids = grown, returned->room = room;
            }
            returned->ids[returned->len++] = sq.column_int64(stmt, 0);
        }
        sq.reset(stmt);
        if (stepped != SQLITE_DONE)
            return stepped;
        *changed += sq.changes(db);
    }
    return SQLITE_OK;
}

PyDoc_STRVAR(execute_rows_doc,
"execute_rows(handle, sql, rows, returning=False)\n--\n\n"
"executemany(sql, rows) on handle (an SQLiteHandle), the rows' values (None, int, float,\n"
"str, bytes) bound as sqlite3 binds them, with the GIL released once for all rows\n"
"instead of for each. Returns the number of rows changed or, with returning, the first\n"
"column of every row the statement returned, as integers (RETURNING id, or a SELECT's);\n"
"(code, message) for an error SQLite reported.");

static PyObject *
execute_rows(PyObject *self, PyObject *args)
{
    PyObject *handle, *rows;
    const char *sql;
    int returning = 0;
    if (!PyArg_ParseTuple(args, "OsO!|p:execute_rows", &handle, &sql, &PyList_Type, &rows,
                          &returning))
        return NULL;
    sqlite3 *db = handle_acquire(handle);
    if (db == NULL)
        return NULL;
    Value *values;
    Py_ssize_t width, runnable;
    PyObject *result = NULL, *bad_type = NULL, *bad_value = NULL, *bad_tb = NULL;
    /* Up to the first row that cannot be bound; executemany would have run the rows
     * before it (and a failing one among them raises first), then raised for it. */
    if (read_rows(rows, &values, &width, &runnable) < 0) {
        if (values == NULL) {
            handle_release(handle);
            return NULL;
        }
        PyErr_Fetch(&bad_type, &bad_value, &bad_tb);
    }
    sqlite3_stmt *stmt = NULL;
    int rc;
    long changed = 0;
    Returned returned = {NULL, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    rc = sq.prepare_v2(db, sql, -1, &stmt, NULL);
    if (rc == SQLITE_OK)
        rc = run_rows(db, stmt, values, runnable, width, returning ? &returned : NULL, &changed);
    Py_END_ALLOW_THREADS
    if (rc == NO_MEMORY) {
        PyErr_NoMemory();
        Py_XDECREF(bad_type);
        Py_XDECREF(bad_value);
        Py_XDECREF(bad_tb);
    }
    else if (rc != SQLITE_OK) {
        result = Py_BuildValue("(is)", sq.errcode(db), sq.errmsg(db));
        Py_XDECREF(bad_type);
        Py_XDECREF(bad_value);
        Py_XDECREF(bad_tb);
    }
    else if (bad_type != NULL)
        PyErr_Restore(bad_type, bad_value, bad_tb);
    else if (returning) {
        result = PyList_New(returned.len);
        for (Py_ssize_t i = 0; result != NULL && i < returned.len; i++) {
            PyObject *id = PyLong_FromLongLong(returned.ids[i]);
            if (id == NULL)
                Py_CLEAR(result);
            else
                PyList_SET_ITEM(result, i, id);
        }
    }
    else
        result = PyLong_FromLong(changed);
    if (stmt != NULL)
        sq.finalize(stmt);
    handle_release(handle);
    free(returned.ids);
    PyMem_Free(values);
    return result;
}

/* One statement of execute_steps, its values read with the GIL held. */
typedef struct {
    const char *sql;
    Value *values; /* rows * width of them, or NULL */
    Py_ssize_t rows, width;
    PlanEntry *plan; /* a spans step: the plan's entries, over payload */
    Py_ssize_t plan_len;
    Py_buffer payload;
    int has_payload;
    const char *project;
    Py_ssize_t project_len;
    SeqTable seqs;
} Step;

static void
steps_free(Step *steps, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyMem_Free(steps[i].values);
        PyMem_Free(steps[i].plan);
        PyMem_Free(steps[i].seqs.slots);
        if (steps[i].has_payload)
            PyBuffer_Release(&steps[i].payload);
    }
    PyMem_Free(steps);
}

/* A step's C form: (sql, None), (sql, rows) or (sql, payload, project, plan[, seqs]). */
static int
read_step(PyObject *item, Step *step)
{
    Py_ssize_t size = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : 0;
    if (size != 2 && size != 4 && size != 5) {
        PyErr_SetString(PyExc_TypeError, "a step is (sql, rows or None) or "
                                         "(sql, payload, project, plan[, seqs])");
        return -1;
    }
    step->sql = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
    if (step->sql == NULL)
        return -1;
    if (size == 5 && seq_table_read(PyTuple_GET_ITEM(item, 4), &step->seqs) < 0)
        return -1;
    if (size >= 4) {
        PyObject *plan = PyTuple_GET_ITEM(item, 3);
        if (!PyList_Check(plan)) {
            PyErr_SetString(PyExc_TypeError, "a plan is a list");
            return -1;
        }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &step->payload, PyBUF_SIMPLE) < 0)
            return -1;
        step->has_payload = 1;
        step->project = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 2), &step->project_len);
        if (step->project == NULL)
            return -1;
        step->plan = plan_entries(plan, step->payload.len);
        step->plan_len = PyList_GET_SIZE(plan);
        return step->plan == NULL ? -1 : 0;
    }
    PyObject *rows = PyTuple_GET_ITEM(item, 1);
    if (rows == Py_None) { /* run once, without parameters */
        step->rows = 1;
        return 0;
    }
    if (!PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "rows are a list");
        return -1;
    }
    step->rows = PyList_GET_SIZE(rows);
    Py_ssize_t readable;
    return read_rows(rows, &step->values, &step->width, &readable);
}

/* Run one step (no GIL): INSERT_OK or what went wrong. */
static int
run_step(sqlite3 *db, const Step *step)
{
    if (step->rows == 0 && step->plan == NULL)
        return INSERT_OK;
    sqlite3_stmt *stmt = NULL;
    if (sq.prepare_v2(db, step->sql, -1, &stmt, NULL) != SQLITE_OK)
        return INSERT_SQLITE;
    int outcome = INSERT_OK;
    long changed = 0;
    if (step->plan != NULL) {
        for (Py_ssize_t i = 0; i < step->plan_len && outcome == INSERT_OK; i++)
            outcome = insert_scope_spans(stmt, step->payload.buf, &step->plan[i], step->project,
                                         step->project_len, &step->seqs, &changed, db);
    }
    else if (run_rows(db, stmt, step->values, step->rows, step->width, NULL, &changed) !=
             SQLITE_OK)
        outcome = INSERT_SQLITE;
    sq.finalize(stmt);
    return outcome;
}

PyDoc_STRVAR(execute_steps_doc,
"execute_steps(handle, steps)\n--\n\n"
"Run steps in order on handle (an SQLiteHandle) with the GIL released once for all of\n"
"them: (sql, None) runs sql once (BEGIN, COMMIT); (sql, rows) runs it for each row,\n"
"values bound as sqlite3 binds them;\n"
"(sql, payload, project, plan) runs it for each span of payload that plan lists, with\n"
"parameters ?1-?14 a span row's values as build_rows gives them; with seqs, a dict of\n"
"trace id -> int, as (sql, payload, project, plan, seqs), ?15 is the span's trace's\n"
"(NULL for a trace id not in it). Every value is read\n"
"before any step runs (an error there, such as an int too large, runs none). Returns\n"
"None, or (step index, code, message) for the error SQLite reported, after which no\n"
"further step ran.");

static PyObject *
execute_steps(PyObject *self, PyObject *args)
{
    PyObject *handle, *list;
    if (!PyArg_ParseTuple(args, "OO!:execute_steps", &handle, &PyList_Type, &list))
        return NULL;
    sqlite3 *db = handle_acquire(handle);
    if (db == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    Step *steps = PyMem_Calloc(n ? n : 1, sizeof *steps);
    if (steps == NULL) {
        handle_release(handle);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (read_step(PyList_GET_ITEM(list, i), &steps[i]) < 0) {
            steps_free(steps, n);
            handle_release(handle);
            return NULL;
        }
    int outcome = INSERT_OK;
    Py_ssize_t failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; failed < n && outcome == INSERT_OK; failed++)
        outcome = run_step(db, &steps[failed]);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (outcome == INSERT_SQLITE)
        result = Py_BuildValue("(nis)", failed - 1, sq.errcode(db), sq.errmsg(db));
    else if (outcome == INSERT_MALFORMED)
        PyErr_SetString(PyExc_ValueError, "not well-formed protobuf");
    else if (outcome == INSERT_OVERFLOW)
        PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to SQLite INTEGER");
    else
        result = Py_NewRef(Py_None);
    handle_release(handle);
    steps_free(steps, n);
    return result;
}

static PyMethodDef methods[] = {
    {"build_rows", build_rows, METH_VARARGS, build_rows_doc},
    {"check_spans", check_spans, METH_O, check_spans_doc},
    {"stream_commands", stream_commands, METH_VARARGS, stream_commands_doc},
    {"count_replies", count_replies, METH_VARARGS, count_replies_doc},
    {"json_to_wire", json_to_wire, METH_VARARGS, json_to_wire_doc},
    {"resource_spans_layout", resource_spans_layout, METH_O, resource_spans_layout_doc},
    {"received", received, METH_VARARGS, received_doc},
    {"resource_facts", resource_facts, METH_O, resource_facts_doc},
    {"serialize_resource_spans", serialize_resource_spans, METH_VARARGS,
     serialize_resource_spans_doc},
    {"load_sqlite", load_sqlite, METH_O, load_sqlite_doc},
    {"execute_rows", execute_rows, METH_VARARGS, execute_rows_doc},
    {"execute_steps", execute_steps, METH_VARARGS, execute_steps_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "collector._wire",
    "calltrace's hot loops over the OTLP wire format, in C (see collector/_wire.c).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__wire(void)
{
    TRUE_TEXT = PyUnicode_InternFromString("true");
    FALSE_TEXT = PyUnicode_InternFromString("false");
    if (TRUE_TEXT == NULL || FALSE_TEXT == NULL)
        return NULL;
    if (PyType_Ready(&SQLiteHandleType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "SQLiteHandle", Py_NewRef((PyObject *)&SQLiteHandleType)) < 0) {
        Py_DECREF(&SQLiteHandleType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
