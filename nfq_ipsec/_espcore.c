/*
 * _espcore: the per-packet work of ESP AEAD SAs, in C.
 *
 * Why: in Python, the framing around one AEAD call (headers, padding, nonce, AAD, checksum, the
 * replay window, the SA's accounting) costs two to three times the call itself, and the engine's
 * per-packet interpreter work is what kept it far from the NFQUEUE ceiling. The cryptography stays
 * in the SA's own `cryptography` AEAD object (AESGCM / ChaCha20Poly1305, created once per SA):
 * this file only calls its encrypt()/decrypt() and does the byte shuffling around them.
 *
 * Scope: ESP with AES-GCM-16 or ChaCha20-Poly1305 over IPv4 (transport mode for IPv4 packets
 * without options, tunnel mode with an IPv4 outer header and an IPv4 or IPv6 inner packet). The
 * Python code in esp.py remains the general path and the specification: whatever this file does
 * not handle it declines (returns None) *before changing anything*, and the tests check that both
 * produce the same bytes.
 *
 *   SaCounters   an SA's counters plus the state the fast path needs (sequence number, lifetime
 *                limits as sa.py computes them); sa.py subclasses it.
 *   CounterPair  packets/bytes of a policy; spd.py subclasses it.
 *   EspCore      one SA's constants (SPI, salt, addresses, the AEAD's bound methods) and its
 *                SaCounters and ReplayWindow: encap()/decap() for esp.py.
 *   FastPath     the engine's flow table: flows whose decision the pipeline has made once (protect
 *                with SA x; decrypted with SA y and allowed by policy z) are handled here without
 *                entering Python, called from the NFQUEUE binding through a capsule. Any doubt,
 *                any error, any limit about to be reached: the packet goes to Python ("punt").
 */
#include "_espcore.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <structmember.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROTO_IPIP 4
#define PROTO_IPV6 41
#define PROTO_ESP 50
#define NO_NEXT_HEADER 59
#define OUTER_TTL 64
#define ICV_LEN 16
#define IV_LEN 8
#define ESP_HDR 8
/* SPI + seq + IV + 2 trailer bytes + ICV: the shortest ESP packet of these transforms */
#define ESP_MIN_LEN (ESP_HDR + IV_LEN + 2 + ICV_LEN)

/* counter names: the values of nfq_ipsec/counters.py (tests/unit/test_espcore.py checks them) */
#define C_IN_STATE_SEQ_ERROR "XfrmInStateSeqError"
#define C_IN_STATE_PROTO_ERROR "XfrmInStateProtoError"
#define C_IN_STATE_MODE_ERROR "XfrmInStateModeError"
#define C_IN_PADDING_ERROR "NfqInPaddingError"
#define C_IN_DUMMY_PACKET "NfqInDummyPacket"

static PyObject *DropType;       /* nfq_ipsec.errors.Drop (imported on first use: no import cycle) */
static PyObject *InvalidTagType; /* cryptography.exceptions.InvalidTag */
static uint16_t next_ip_id;      /* outer IPv4 ID of fast-path tunnel packets */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t rd32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void wr64(uint8_t *p, uint64_t v) { wr32(p, (uint32_t)(v >> 32)); wr32(p + 4, (uint32_t)v); }

/* Checksum of a 20-byte IPv4 header whose checksum field is zero. */
static uint16_t
ipv4_checksum(const uint8_t *h)
{
    uint32_t s = 0;
    for (int i = 0; i < 20; i += 2)
        s += rd16(h + i);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static int parse_u64(PyObject *o, uint64_t *v, const char *what);

/* dst = the 20-byte IPv4 header src with a new total length and protocol, checksum recomputed. */
static void
rewrite_ipv4_header(uint8_t *dst, const uint8_t *src, uint16_t total, uint8_t proto)
{
    memcpy(dst, src, 20);
    wr16(dst + 2, total);
    dst[9] = proto;
    dst[10] = dst[11] = 0;
    wr16(dst + 10, ipv4_checksum(dst));
}

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.monotonic() reads on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

PyObject *
espcore_raise_drop(const char *counter, const char *reason)
{
    PyObject *exc;

    if (DropType == NULL) {
        PyObject *m = PyImport_ImportModule("nfq_ipsec.errors");
        if (m == NULL)
            return NULL;
        DropType = PyObject_GetAttrString(m, "Drop");
        Py_DECREF(m);
        if (DropType == NULL)
            return NULL;
    }
    exc = PyObject_CallFunction(DropType, "ss", counter, reason);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* ================================ SaCounters ================================ */

typedef struct {
    PyObject_HEAD
    unsigned long long packets, bytes, replay_drops, integrity_failures, format_errors, expired_drops,
        seq_exhausted;
    unsigned long long seq;           /* outbound: the last sequence number used */
    unsigned long long seq_max;       /* outbound: the last one allowed (2^32-1, or 2^64-1 with ESN) */
    unsigned long long limit_packets; /* fast path only below these (0 = no limit): the packet that */
    unsigned long long limit_bytes;   /* reaches a lifetime limit takes the Python path (its event) */
    double deadline;                  /* CLOCK_MONOTONIC time of the next time limit; 0 none, < 0 never fast */
    char fast_ok;                     /* the SA is usable by the fast path at all (not dead, has a core) */
} SaCountersObject;

/* Field accessors that convert first and store only on success (structmember's T_ULONGLONG and
 * T_DOUBLE setters overwrite the field before reporting a bad value). closure = field offset. */
#define FIELD(obj, closure, type) ((type *)((char *)(obj) + (size_t)(closure)))

static PyObject *
u64_get(PyObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(*FIELD(self, closure, unsigned long long));
}

static int
u64_set(PyObject *self, PyObject *value, void *closure)
{
    unsigned long long v;

    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "counters cannot be deleted");
        return -1;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "a counter must be an int, got %.50s", Py_TYPE(value)->tp_name);
        return -1;
    }
    v = PyLong_AsUnsignedLongLong(value); /* OverflowError below 0 or above 2^64-1 */
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *FIELD(self, closure, unsigned long long) = v;
    return 0;
}

static PyObject *
double_get(PyObject *self, void *closure)
{
    return PyFloat_FromDouble(*FIELD(self, closure, double));
}

static int
double_set(PyObject *self, PyObject *value, void *closure)
{
    double v;

    if (value == NULL || !(PyFloat_Check(value) || PyLong_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "must be a number");
        return -1;
    }
    v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *FIELD(self, closure, double) = v;
    return 0;
}

static PyObject *
bool_get(PyObject *self, void *closure)
{
    return PyBool_FromLong(*FIELD(self, closure, char));
}

static int
bool_set(PyObject *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyBool_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "must be True or False");
        return -1;
    }
    *FIELD(self, closure, char) = (char)(value == Py_True);
    return 0;
}

#define U64_FIELD(T, name) {#name, u64_get, u64_set, NULL, (void *)offsetof(T, name)}

static PyGetSetDef SaCounters_getset[] = {
    U64_FIELD(SaCountersObject, packets),
    U64_FIELD(SaCountersObject, bytes),
    U64_FIELD(SaCountersObject, replay_drops),
    U64_FIELD(SaCountersObject, integrity_failures),
    U64_FIELD(SaCountersObject, format_errors),
    U64_FIELD(SaCountersObject, expired_drops),
    U64_FIELD(SaCountersObject, seq_exhausted),
    U64_FIELD(SaCountersObject, seq),
    U64_FIELD(SaCountersObject, seq_max),
    U64_FIELD(SaCountersObject, limit_packets),
    U64_FIELD(SaCountersObject, limit_bytes),
    {"deadline", double_get, double_set, NULL, (void *)offsetof(SaCountersObject, deadline)},
    {"fast_ok", bool_get, bool_set, NULL, (void *)offsetof(SaCountersObject, fast_ok)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SaCounters_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nfq_ipsec._espcore.SaCounters",
    .tp_basicsize = sizeof(SaCountersObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Per-SA counters and the outbound sequence number, in C so the fast path can update them.",
    .tp_getset = SaCounters_getset,
    .tp_new = PyType_GenericNew,
};

/* Whether one more packet of `len` bytes stays short of the SA's volume limits. */
static int
sa_volume_allows(const SaCountersObject *s, unsigned long long len)
{
    if (s->limit_packets && s->packets + 1 >= s->limit_packets)
        return 0;
    return !(s->limit_bytes && s->bytes + len >= s->limit_bytes);
}

/* Whether the fast path may process one more packet of `len` bytes on this SA now. */
static int
sa_fast_allows(const SaCountersObject *s, unsigned long long len)
{
    if (!s->fast_ok || !sa_volume_allows(s, len))
        return 0;
    return !(s->deadline != 0.0 && (s->deadline < 0.0 || monotonic_now() >= s->deadline));
}

/* ================================ CounterPair ================================ */

typedef struct {
    PyObject_HEAD
    unsigned long long packets, bytes;
} CounterPairObject;

static PyGetSetDef CounterPair_getset[] = {
    U64_FIELD(CounterPairObject, packets),
    U64_FIELD(CounterPairObject, bytes),
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *
CounterPair_account(CounterPairObject *self, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    self->packets++;
    self->bytes += n;
    Py_RETURN_NONE;
}

static PyMethodDef CounterPair_methods[] = {
    {"account", (PyCFunction)CounterPair_account, METH_O, "Count one packet of `nbytes` bytes."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CounterPair_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nfq_ipsec._espcore.CounterPair",
    .tp_basicsize = sizeof(CounterPairObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Packets and bytes (a policy's counters), in C so the fast path can update them.",
    .tp_getset = CounterPair_getset,
    .tp_methods = CounterPair_methods,
    .tp_new = PyType_GenericNew,
};

/* ================================ EspCore ================================ */

typedef struct {
    PyObject_HEAD
    PyObject *encrypt; /* the AEAD's bound encrypt(nonce, data, aad) */
    PyObject *decrypt; /* ... and decrypt */
    SaCountersObject *counters;
    ReplayWindowObject *replay;
    uint8_t salt[4];
    uint32_t spi;
    int esn;
    int tunnel;
    unsigned int tfc_pad;
    uint8_t src[4], dst[4]; /* the SA's (outer) addresses */
} EspCoreObject;

static int
EspCore_init(EspCoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"aead", "salt", "spi", "esn", "tunnel", "src", "dst", "tfc_pad", "counters",
                             "replay", NULL};
    PyObject *aead, *counters, *replay, *enc = NULL, *dec = NULL, *spi_obj, *tfc_obj;
    Py_buffer salt, src, dst;
    uint64_t spi, tfc_pad;
    int esn, tunnel;
    int rc = -1;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oy*Oppy*y*OO!O!", kwlist, &aead, &salt, &spi_obj, &esn, &tunnel,
                                     &src, &dst, &tfc_obj, &SaCounters_Type, &counters, &ReplayWindow_Type,
                                     &replay))
        return -1;
    if (salt.len != 4 || src.len != 4 || dst.len != 4) {
        PyErr_SetString(PyExc_ValueError, "EspCore: salt, src and dst must be 4 bytes (IPv4 SA)");
        goto out;
    }
    if (parse_u64(spi_obj, &spi, "spi") < 0 || parse_u64(tfc_obj, &tfc_pad, "tfc_pad") < 0)
        goto out;
    if (spi > 0xffffffffULL || tfc_pad > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "EspCore: spi or tfc_pad out of range");
        goto out;
    }
    enc = PyObject_GetAttrString(aead, "encrypt");
    if (enc == NULL)
        goto out;
    dec = PyObject_GetAttrString(aead, "decrypt");
    if (dec == NULL)
        goto out;
    if (InvalidTagType == NULL) {
        PyObject *m = PyImport_ImportModule("cryptography.exceptions");
        if (m == NULL)
            goto out;
        InvalidTagType = PyObject_GetAttrString(m, "InvalidTag");
        Py_DECREF(m);
        if (InvalidTagType == NULL)
            goto out;
    }
    memcpy(self->salt, salt.buf, 4);
    memcpy(self->src, src.buf, 4);
    memcpy(self->dst, dst.buf, 4);
    self->spi = (uint32_t)spi;
    self->esn = esn;
    self->tunnel = tunnel;
    self->tfc_pad = (unsigned int)tfc_pad;
    Py_XSETREF(self->encrypt, enc);
    Py_XSETREF(self->decrypt, dec);
    enc = dec = NULL;
    Py_INCREF(counters);
    Py_XSETREF(self->counters, (SaCountersObject *)counters);
    Py_INCREF(replay);
    Py_XSETREF(self->replay, (ReplayWindowObject *)replay);
    rc = 0;
out:
    Py_XDECREF(enc);
    Py_XDECREF(dec);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return rc;
}

/* 1 if the core can be used; 0 with ValueError set if __init__ never succeeded (or the GC cleared it). */
static int
core_ready(const EspCoreObject *c)
{
    if (c->encrypt != NULL && c->decrypt != NULL && c->counters != NULL && c->replay != NULL)
        return 1;
    PyErr_SetString(PyExc_ValueError, "EspCore is not initialised");
    return 0;
}

static int
EspCore_traverse(EspCoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->encrypt);
    Py_VISIT(self->decrypt);
    Py_VISIT(self->counters);
    Py_VISIT(self->replay);
    return 0;
}

static int
EspCore_clear(EspCoreObject *self)
{
    Py_CLEAR(self->encrypt);
    Py_CLEAR(self->decrypt);
    Py_CLEAR(self->counters);
    Py_CLEAR(self->replay);
    return 0;
}

static void
EspCore_dealloc(EspCoreObject *self)
{
    PyObject_GC_UnTrack(self);
    EspCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The AAD: SPI | seq_lo, or SPI | seq_hi | seq_lo with ESN (RFC 4106 §5, RFC 7634 §2.1). */
static PyObject *
make_aad(const EspCoreObject *c, uint64_t seq)
{
    uint8_t aad[12];

    wr32(aad, c->spi);
    if (c->esn) {
        wr32(aad + 4, (uint32_t)(seq >> 32));
        wr32(aad + 8, (uint32_t)seq);
        return PyBytes_FromStringAndSize((const char *)aad, 12);
    }
    wr32(aad + 4, (uint32_t)seq);
    return PyBytes_FromStringAndSize((const char *)aad, 8);
}

static PyObject *
make_nonce(const EspCoreObject *c, const uint8_t *iv)
{
    uint8_t nonce[12];

    memcpy(nonce, c->salt, 4);
    memcpy(nonce + 4, iv, 8);
    return PyBytes_FromStringAndSize((const char *)nonce, 12);
}

/*
 * ESP-protect `p` (n bytes) under sequence number `seq`; the IPv4 ID of a tunnel's outer header is
 * `ip_id`. Returns the ESP packet, Py_None (new reference) if this is not a case handled here (the
 * caller takes the general path, which also reports malformed packets), or NULL with an exception.
 * Changes nothing in the SA.
 */
static PyObject *
core_encap(EspCoreObject *c, const uint8_t *p, Py_ssize_t n, uint64_t seq, uint16_t ip_id)
{
    uint8_t hdr[20];
    const uint8_t *payload;
    Py_ssize_t payload_len, plen, out_len;
    unsigned int total, padlen, nh;
    PyObject *pt, *nonce, *aad, *ct, *out, *args[3];
    uint8_t iv[8];
    uint8_t *w;

    if (c->tunnel) {
        int version = n > 0 ? p[0] >> 4 : 0;
        uint8_t tos;
        uint16_t flags = 0;

        if (version == 4 && n >= 20) {
            total = rd16(p + 2);
            tos = p[1];
            if (p[6] & 0x40)
                flags = 0x4000; /* DF copied from the inner header (RFC 4301 §8.1) */
            nh = PROTO_IPIP;
        } else if (version == 6 && n >= 40) {
            total = 40 + rd16(p + 4);
            tos = (uint8_t)(((p[0] & 0x0f) << 4) | (p[1] >> 4));
            nh = PROTO_IPV6;
        } else {
            Py_RETURN_NONE;
        }
        if (total < 20 || (Py_ssize_t)total > n || c->tfc_pad > total)
            Py_RETURN_NONE;
        payload = p;
        payload_len = total;
        padlen = (2 - total) & 3;
        plen = payload_len + padlen + 2;
        out_len = 20 + ESP_HDR + IV_LEN + plen + ICV_LEN;
        if (out_len > 0xffff)
            Py_RETURN_NONE;
        hdr[0] = 0x45;
        hdr[1] = tos;
        wr16(hdr + 2, (uint16_t)out_len);
        wr16(hdr + 4, ip_id);
        wr16(hdr + 6, flags);
        hdr[8] = OUTER_TTL;
        hdr[9] = PROTO_ESP;
        hdr[10] = hdr[11] = 0;
        memcpy(hdr + 12, c->src, 4);
        memcpy(hdr + 16, c->dst, 4);
        wr16(hdr + 10, ipv4_checksum(hdr));
    } else {
        if (n < 20 || p[0] != 0x45)
            Py_RETURN_NONE;
        total = rd16(p + 2);
        if (total < 20 || (Py_ssize_t)total > n || (p[6] & 0x3f) || p[7])
            Py_RETURN_NONE;
        payload = p + 20;
        payload_len = total - 20;
        padlen = (2 - total) & 3;
        plen = payload_len + padlen + 2;
        out_len = 20 + ESP_HDR + IV_LEN + plen + ICV_LEN;
        if (out_len > 0xffff)
            Py_RETURN_NONE;
        nh = p[9];
        rewrite_ipv4_header(hdr, p, (uint16_t)out_len, PROTO_ESP);
    }

    /* plaintext: payload | padding 1, 2, 3... | pad length | next header (RFC 4303 §2.4) */
    pt = PyBytes_FromStringAndSize(NULL, plen);
    if (pt == NULL)
        return NULL;
    w = (uint8_t *)PyBytes_AS_STRING(pt);
    memcpy(w, payload, (size_t)payload_len);
    for (unsigned int i = 0; i < padlen; i++)
        w[payload_len + i] = (uint8_t)(i + 1);
    w[plen - 2] = (uint8_t)padlen;
    w[plen - 1] = (uint8_t)nh;

    wr64(iv, seq); /* RFC 4106 §3.1: the sequence number is a never-repeating IV */
    nonce = make_nonce(c, iv);
    aad = make_aad(c, seq);
    if (nonce == NULL || aad == NULL) {
        Py_XDECREF(nonce);
        Py_XDECREF(aad);
        Py_DECREF(pt);
        return NULL;
    }
    args[0] = nonce;
    args[1] = pt;
    args[2] = aad;
    ct = PyObject_Vectorcall(c->encrypt, args, 3, NULL);
    Py_DECREF(nonce);
    Py_DECREF(aad);
    Py_DECREF(pt);
    if (ct == NULL)
        return NULL;
    if (!PyBytes_CheckExact(ct) || PyBytes_GET_SIZE(ct) != plen + ICV_LEN) {
        Py_DECREF(ct);
        PyErr_SetString(PyExc_RuntimeError, "EspCore: the AEAD returned an unexpected ciphertext");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, out_len);
    if (out == NULL) {
        Py_DECREF(ct);
        return NULL;
    }
    w = (uint8_t *)PyBytes_AS_STRING(out);
    memcpy(w, hdr, 20);
    wr32(w + 20, c->spi);
    wr32(w + 24, (uint32_t)seq);
    memcpy(w + 28, iv, 8);
    memcpy(w + 36, PyBytes_AS_STRING(ct), (size_t)(plen + ICV_LEN));
    Py_DECREF(ct);
    return out;
}

/* Why core_open / core_finish refused a packet. */
enum {
    OPEN_OK = 0,
    OPEN_NOT_MINE,  /* not a case for this file: the general path decides (nothing counted) */
    OPEN_REPLAY,    /* + replay code */
    OPEN_ICV,
    OPEN_PADDING,
    OPEN_DUMMY,
    OPEN_INNER,     /* tunnel: the inner packet is inconsistent (reason in OpenResult.why) */
    OPEN_ERROR,     /* a Python exception is set */
};

typedef struct {
    int code;
    int replay_code;
    uint64_t seq;      /* the full sequence number */
    PyObject *pt;      /* the decrypted ESP payload (owned) */
    Py_ssize_t end;    /* payload length without the trailer */
    unsigned int nh;   /* next header */
    Py_ssize_t inner_len; /* tunnel: the inner packet's length; transport: 20 + end */
    char why[64];
} OpenResult;

/*
 * Check the replay window, verify and decrypt, check the trailer (and the inner packet in tunnel
 * mode). Nothing in the SA changes: the caller records the sequence number (replay_update) once
 * it accepts the packet.
 */
static void
core_open(EspCoreObject *c, const uint8_t *p, Py_ssize_t n, OpenResult *r)
{
    unsigned int total;
    uint32_t seq_low;
    PyObject *nonce, *aad, *data, *args[3];
    const uint8_t *pt;
    Py_ssize_t ptlen;
    unsigned int padlen;

    memset(r, 0, sizeof(*r));
    r->code = OPEN_NOT_MINE;
    if (n < 20 || p[0] != 0x45 || p[9] != PROTO_ESP)
        return;
    total = rd16(p + 2);
    if (total < 20 + ESP_MIN_LEN || (Py_ssize_t)total > n || (p[6] & 0x3f) || p[7] || rd32(p + 20) != c->spi)
        return;
    seq_low = rd32(p + 24);
    r->replay_code = replay_check(c->replay, seq_low, &r->seq);
    if (r->replay_code != REPLAY_OK) {
        r->code = OPEN_REPLAY;
        return;
    }
    nonce = make_nonce(c, p + 28);
    aad = make_aad(c, r->seq);
    data = PyMemoryView_FromMemory((char *)p + 36, (Py_ssize_t)total - 36, PyBUF_READ);
    if (nonce == NULL || aad == NULL || data == NULL) {
        Py_XDECREF(nonce);
        Py_XDECREF(aad);
        Py_XDECREF(data);
        r->code = OPEN_ERROR;
        return;
    }
    args[0] = nonce;
    args[1] = data;
    args[2] = aad;
    r->pt = PyObject_Vectorcall(c->decrypt, args, 3, NULL);
    Py_DECREF(nonce);
    Py_DECREF(aad);
    if (Py_REFCNT(data) > 1) {
        /* decrypt() kept the view of a buffer that is released after this call: release the view so
         * that later use raises ValueError instead of reading freed memory */
        PyObject *et, *ev, *tb, *res;
        PyErr_Fetch(&et, &ev, &tb);
        res = PyObject_CallMethod(data, "release", NULL);
        if (res == NULL)
            PyErr_Clear(); /* (it holds exports of its own: nothing more can be done here) */
        Py_XDECREF(res);
        PyErr_Restore(et, ev, tb);
    }
    Py_DECREF(data);
    if (r->pt == NULL) {
        if (PyErr_ExceptionMatches(InvalidTagType)) {
            PyErr_Clear();
            r->code = OPEN_ICV;
        } else {
            r->code = OPEN_ERROR;
        }
        return;
    }
    if (!PyBytes_CheckExact(r->pt) || PyBytes_GET_SIZE(r->pt) < 2) {
        PyErr_SetString(PyExc_RuntimeError, "EspCore: the AEAD returned an unexpected plaintext");
        r->code = OPEN_ERROR;
        return;
    }
    pt = (const uint8_t *)PyBytes_AS_STRING(r->pt);
    ptlen = PyBytes_GET_SIZE(r->pt);
    padlen = pt[ptlen - 2];
    r->nh = pt[ptlen - 1];
    r->end = ptlen - 2 - (Py_ssize_t)padlen;
    r->code = OPEN_PADDING;
    if (r->end < 0)
        return;
    for (unsigned int i = 0; i < padlen; i++)
        if (pt[r->end + i] != (uint8_t)(i + 1))
            return;
    if (r->nh == NO_NEXT_HEADER) {
        r->code = OPEN_DUMMY;
        return;
    }
    r->code = OPEN_INNER;
    if (c->tunnel) {
        unsigned int itotal;
        if (r->nh == PROTO_IPIP) {
            if (r->end < 20 || pt[0] >> 4 != 4) {
                snprintf(r->why, sizeof(r->why), "inner packet is not IPv4");
                return;
            }
            itotal = rd16(pt + 2);
            if (itotal < (unsigned int)((pt[0] & 0x0f) << 2) || itotal < 20 || (Py_ssize_t)itotal > r->end) {
                snprintf(r->why, sizeof(r->why), "inner IPv4 length is inconsistent");
                return;
            }
        } else if (r->nh == PROTO_IPV6) {
            if (r->end < 40 || pt[0] >> 4 != 6) {
                snprintf(r->why, sizeof(r->why), "inner packet is not IPv6");
                return;
            }
            itotal = 40 + rd16(pt + 4);
            if ((Py_ssize_t)itotal > r->end) {
                snprintf(r->why, sizeof(r->why), "inner IPv6 length is inconsistent");
                return;
            }
        } else {
            snprintf(r->why, sizeof(r->why), "tunnel mode SA carries protocol %u", r->nh);
            return;
        }
        r->inner_len = itotal;
    } else {
        r->inner_len = 20 + r->end;
    }
    r->code = OPEN_OK;
}

/* The cleartext packet of an accepted OpenResult (consumes r->pt). */
static PyObject *
core_finish(const uint8_t *p, OpenResult *r, int tunnel)
{
    PyObject *out;
    uint8_t *w;

    if (tunnel) {
        if (Py_REFCNT(r->pt) != 1) /* the AEAD kept a reference: _PyBytes_Resize needs the only one */
            return PyBytes_FromStringAndSize(PyBytes_AS_STRING(r->pt), r->inner_len);
        out = r->pt;
        r->pt = NULL;
        if (PyBytes_GET_SIZE(out) != r->inner_len && _PyBytes_Resize(&out, r->inner_len) < 0)
            return NULL; /* (_PyBytes_Resize released it) */
        return out;
    }
    out = PyBytes_FromStringAndSize(NULL, r->inner_len);
    if (out == NULL)
        return NULL;
    w = (uint8_t *)PyBytes_AS_STRING(out);
    rewrite_ipv4_header(w, p, (uint16_t)r->inner_len, (uint8_t)r->nh);
    memcpy(w + 20, PyBytes_AS_STRING(r->pt), (size_t)r->end);
    Py_CLEAR(r->pt);
    return out;
}

static int
parse_u64(PyObject *o, uint64_t *v, const char *what)
{
    unsigned long long x;

    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *v = x;
    return 0;
}

static PyObject *
EspCore_encap(EspCoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t seq, ip_id;
    PyObject *out;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encap(packet, seq, ip_id) takes 3 arguments");
        return NULL;
    }
    if (!core_ready(self) || parse_u64(args[1], &seq, "seq") < 0 || parse_u64(args[2], &ip_id, "ip_id") < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    out = core_encap(self, view.buf, view.len, seq, (uint16_t)ip_id);
    PyBuffer_Release(&view);
    return out;
}

/*
 * decap(packet) -> cleartext packet | None. The whole inbound ESP processing of esp.decapsulate's
 * fast case, with its exact counters and Drop reasons; None: not handled here, nothing counted.
 */
static PyObject *
EspCore_decap(EspCoreObject *self, PyObject *arg)
{
    Py_buffer view;
    OpenResult r;
    PyObject *out = NULL;
    char reason[64];

    if (!core_ready(self) || PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    core_open(self, view.buf, view.len, &r);
    switch (r.code) {
    case OPEN_NOT_MINE:
        out = Py_NewRef(Py_None);
        break;
    case OPEN_ERROR:
        break;
    case OPEN_REPLAY:
        self->counters->replay_drops++;
        espcore_raise_drop(C_IN_STATE_SEQ_ERROR, replay_reason(r.replay_code));
        break;
    case OPEN_ICV:
        self->counters->integrity_failures++;
        espcore_raise_drop(C_IN_STATE_PROTO_ERROR, "ICV mismatch");
        break;
    default:
        /* authentic: the window moves whatever the payload turns out to be (as esp.py) */
        replay_update(self->replay, r.seq);
        if (r.code == OPEN_OK) {
            out = core_finish(view.buf, &r, self->tunnel);
        } else if (r.code == OPEN_PADDING) {
            const uint8_t *pt = (const uint8_t *)PyBytes_AS_STRING(r.pt);
            self->counters->format_errors++;
            snprintf(reason, sizeof(reason), "bad ESP padding (pad length %u)", pt[PyBytes_GET_SIZE(r.pt) - 2]);
            espcore_raise_drop(C_IN_PADDING_ERROR, reason);
        } else if (r.code == OPEN_DUMMY) {
            espcore_raise_drop(C_IN_DUMMY_PACKET, "ESP dummy packet (next header 59)");
        } else {
            self->counters->format_errors++;
            espcore_raise_drop(C_IN_STATE_MODE_ERROR, r.why);
        }
    }
    Py_XDECREF(r.pt);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *
EspCore_get_replay(EspCoreObject *self, void *closure)
{
    return Py_NewRef(self->replay != NULL ? (PyObject *)self->replay : Py_None);
}

/* Swapping the window (a restarted worker's SA) keeps the core, so learnt flows stay valid. */
static int
EspCore_set_replay(EspCoreObject *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyObject_TypeCheck(value, &ReplayWindow_Type)) {
        PyErr_SetString(PyExc_TypeError, "replay must be a ReplayWindow");
        return -1;
    }
    Py_XSETREF(self->replay, (ReplayWindowObject *)Py_NewRef(value));
    return 0;
}

static PyGetSetDef EspCore_getset[] = {
    {"replay", (getter)EspCore_get_replay, (setter)EspCore_set_replay, "The window decap() checks.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef EspCore_methods[] = {
    {"encap", (PyCFunction)(void (*)(void))EspCore_encap, METH_FASTCALL,
     "encap(packet, seq, ip_id) -> ESP packet, or None when the general path must handle it."},
    {"decap", (PyCFunction)EspCore_decap, METH_O,
     "decap(packet) -> cleartext packet (raises Drop, counted), or None for the general path."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EspCore_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nfq_ipsec._espcore.EspCore",
    .tp_basicsize = sizeof(EspCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "EspCore(aead, salt, spi, esn, tunnel, src, dst, tfc_pad, counters, replay): one IPv4 ESP "
              "AEAD SA's framing in C around its cryptography AEAD object.",
    .tp_init = (initproc)EspCore_init,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)EspCore_dealloc,
    .tp_traverse = (traverseproc)EspCore_traverse,
    .tp_clear = (inquiry)EspCore_clear,
    .tp_methods = EspCore_methods,
    .tp_getset = EspCore_getset,
};

/* ================================ FastPath ================================ */

enum { KIND_INPUT_SA = 1, KIND_FORWARD = 2, KIND_OUTPUT = 3, KIND_INNER = 4 };
#define HOOK_INPUT 1
#define HOOK_FORWARD 2
#define HOOK_OUTPUT 3
#define NF_DROP 0
#define NF_ACCEPT 1
#define PUNT (-1)
#define TABLE_SIZE 16384        /* slots, a power of two */
#define TABLE_MAX (TABLE_SIZE / 2)

typedef struct {
    uint8_t kind, proto;
    uint8_t zero[2];
    uint32_t spi;
    uint8_t flow[12]; /* IPv4 bytes 12..24: addresses and ports (KIND_INPUT_SA: outer src, dst, 0) */
} FlowKey;

typedef struct {
    FlowKey key;
    int used;
    uint32_t max_len;
    EspCoreObject *core;
    CounterPairObject *pc[2];
    struct sockaddr_in dst;
} FlowEntry;

typedef struct {
    PyObject_HEAD
    FlowEntry *table;
    uint32_t count;
    int raw_fd, tun_fd;
    unsigned int tun_ifindex;
    char enabled;
    PyObject *on_drop; /* on_drop(counter): count a replayed or forged packet (None: let Python see it) */
    unsigned long long handled, dropped, send_errors, tun_errors, full;
} FastPathObject;

static uint32_t
key_hash(const FlowKey *k)
{
    const uint8_t *b = (const uint8_t *)k;
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < sizeof(*k); i++) {
        h ^= b[i];
        h *= 16777619u;
    }
    return h;
}

static FlowEntry *
table_find(FastPathObject *fp, const FlowKey *k)
{
    uint32_t i = key_hash(k) & (TABLE_SIZE - 1);
    for (;;) {
        FlowEntry *e = &fp->table[i];
        if (!e->used)
            return NULL;
        if (memcmp(&e->key, k, sizeof(*k)) == 0)
            return e;
        i = (i + 1) & (TABLE_SIZE - 1);
    }
}

static void
entry_release(FlowEntry *e)
{
    Py_CLEAR(e->core);
    Py_CLEAR(e->pc[0]);
    Py_CLEAR(e->pc[1]);
    e->used = 0;
}

static void
table_clear(FastPathObject *fp)
{
    if (fp->table == NULL)
        return;
    for (uint32_t i = 0; i < TABLE_SIZE; i++)
        if (fp->table[i].used)
            entry_release(&fp->table[i]);
    fp->count = 0;
}

static int
FastPath_init(FastPathObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"raw_fd", "tun_fd", "tun_ifindex", NULL};
    int raw_fd, tun_fd;
    PyObject *ifindex_obj;
    uint64_t tun_ifindex;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiO", kwlist, &raw_fd, &tun_fd, &ifindex_obj))
        return -1;
    if (parse_u64(ifindex_obj, &tun_ifindex, "tun_ifindex") < 0)
        return -1;
    if (tun_ifindex > 0xffffffffULL) {
        PyErr_SetString(PyExc_ValueError, "tun_ifindex out of range");
        return -1;
    }
    if (self->table == NULL) {
        self->table = PyMem_Calloc(TABLE_SIZE, sizeof(FlowEntry));
        if (self->table == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    table_clear(self);
    self->raw_fd = raw_fd;
    self->tun_fd = tun_fd;
    self->tun_ifindex = (unsigned int)tun_ifindex;
    self->enabled = 1;
    return 0;
}

static int
FastPath_traverse(FastPathObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_drop);
    if (self->table != NULL)
        for (uint32_t i = 0; i < TABLE_SIZE; i++)
            if (self->table[i].used) {
                Py_VISIT(self->table[i].core);
                Py_VISIT(self->table[i].pc[0]);
                Py_VISIT(self->table[i].pc[1]);
            }
    return 0;
}

static int
FastPath_clear_refs(FastPathObject *self)
{
    Py_CLEAR(self->on_drop);
    table_clear(self);
    return 0;
}

static void
FastPath_dealloc(FastPathObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->on_drop);
    table_clear(self);
    PyMem_Free(self->table);
    self->table = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/*
 * learn(kind, proto, spi, flow, core, policies, max_len) -> bool
 *   kind 2/3 (FORWARD/OUTPUT): clear packets of protocol `proto` whose bytes 12..24 are `flow` are
 *     protected with `core`'s SA and sent to its outer destination, if at most `max_len` bytes long;
 *   kind 1: ESP packets with this SPI and outer source+destination (`flow`, 8 bytes) belong to `core`;
 *   kind 4: decrypted by `core` (SPI `spi`), an inner packet of `proto` with these bytes 12..24 is
 *     allowed and goes to the TUN device (tunnel) or back to the kernel (transport).
 *   policies: up to two CounterPair objects accounting each packet (its length: clear / inner).
 * False if the table is full (the flow keeps using the Python path).
 */
static PyObject *
FastPath_learn(FastPathObject *self, PyObject *args)
{
    int kind, proto;
    uint64_t spi, max_len;
    Py_buffer flow;
    PyObject *core, *policies, *spi_obj, *max_obj;
    FlowKey k;
    FlowEntry *e;
    uint32_t i;
    Py_ssize_t npol;

    if (!PyArg_ParseTuple(args, "iiOy*O!O!O", &kind, &proto, &spi_obj, &flow, &EspCore_Type, &core, &PyTuple_Type,
                          &policies, &max_obj))
        return NULL;
    if (parse_u64(spi_obj, &spi, "spi") < 0 || parse_u64(max_obj, &max_len, "max_len") < 0) {
        PyBuffer_Release(&flow);
        return NULL;
    }
    if (self->table == NULL || !core_ready((EspCoreObject *)core)) {
        PyBuffer_Release(&flow);
        if (self->table == NULL)
            PyErr_SetString(PyExc_ValueError, "FastPath is not initialised");
        return NULL;
    }
    memset(&k, 0, sizeof(k));
    npol = PyTuple_GET_SIZE(policies);
    if (kind < KIND_INPUT_SA || kind > KIND_INNER || proto < 0 || proto > 255 || spi > 0xffffffffULL ||
        flow.len > 12 || (kind != KIND_INPUT_SA && flow.len != 12) || npol > 2) {
        PyBuffer_Release(&flow);
        PyErr_SetString(PyExc_ValueError, "FastPath.learn: bad arguments");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < npol; j++)
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(policies, j), &CounterPair_Type)) {
            PyBuffer_Release(&flow);
            PyErr_SetString(PyExc_TypeError, "FastPath.learn: policies must be CounterPair objects");
            return NULL;
        }
    k.kind = (uint8_t)kind;
    k.proto = (uint8_t)proto;
    k.spi = (uint32_t)spi;
    memcpy(k.flow, flow.buf, (size_t)flow.len);
    PyBuffer_Release(&flow);
    e = table_find(self, &k);
    if (e == NULL) {
        if (self->count >= TABLE_MAX) {
            self->full++;
            Py_RETURN_FALSE;
        }
        i = key_hash(&k) & (TABLE_SIZE - 1);
        while (self->table[i].used)
            i = (i + 1) & (TABLE_SIZE - 1);
        e = &self->table[i];
        e->key = k;
        e->used = 1;
        self->count++;
    } else {
        Py_CLEAR(e->core);
        Py_CLEAR(e->pc[0]);
        Py_CLEAR(e->pc[1]);
    }
    e->max_len = (uint32_t)(max_len > 0xffff ? 0xffff : max_len);
    e->core = (EspCoreObject *)Py_NewRef(core);
    for (Py_ssize_t j = 0; j < npol; j++)
        e->pc[j] = (CounterPairObject *)Py_NewRef(PyTuple_GET_ITEM(policies, j));
    memset(&e->dst, 0, sizeof(e->dst));
    e->dst.sin_family = AF_INET;
    memcpy(&e->dst.sin_addr, e->core->dst, 4);
    Py_RETURN_TRUE;
}

static PyObject *
FastPath_clear_method(FastPathObject *self, PyObject *unused)
{
    table_clear(self);
    Py_RETURN_NONE;
}

static void
account_policies(FlowEntry *e, unsigned long long len)
{
    for (int j = 0; j < 2; j++)
        if (e->pc[j] != NULL) {
            e->pc[j]->packets++;
            e->pc[j]->bytes += len;
        }
}

/* Outbound: protect a known flow and send it from the raw socket. */
static int
fast_protect(FastPathObject *fp, int hook, const uint8_t *p, size_t n)
{
    FlowKey k;
    FlowEntry *e;
    EspCoreObject *c;
    SaCountersObject *s;
    PyObject *out;
    uint64_t seq;
    ssize_t sent;

    memset(&k, 0, sizeof(k));
    k.kind = (uint8_t)hook;
    k.proto = p[9];
    memcpy(k.flow, p + 12, 12);
    e = table_find(fp, &k);
    if (e == NULL || n > e->max_len)
        return PUNT;
    c = e->core;
    s = c->counters;
    if (!sa_fast_allows(s, n) || s->seq >= s->seq_max)
        return PUNT;
    seq = s->seq + 1;
    Py_INCREF(c); /* encrypt() may be Python code that empties the table */
    Py_INCREF(s);
    out = core_encap(c, p, (Py_ssize_t)n, seq, next_ip_id++);
    if (out == NULL || out == Py_None) {
        if (out == NULL)
            PyErr_Clear(); /* the Python path will meet (and count) the same problem */
        Py_XDECREF(out);
        Py_DECREF(s);
        Py_DECREF(c);
        return PUNT;
    }
    s->seq = seq;
    s->packets++;
    s->bytes += n;
    account_policies(e, n);
    /* (the GIL stays held: a non-blocking send is shorter than releasing and taking it back) */
    sent = sendto(fp->raw_fd, PyBytes_AS_STRING(out), (size_t)PyBytes_GET_SIZE(out), MSG_DONTWAIT,
                  (const struct sockaddr *)&e->dst, sizeof(e->dst));
    if (sent < 0)
        fp->send_errors++;
    Py_DECREF(out);
    Py_DECREF(s);
    Py_DECREF(c);
    fp->handled++;
    return NF_DROP;
}

/* Inbound: decrypt ESP of a known SA whose inner flow is known to be allowed. */
static int
fast_unprotect(FastPathObject *fp, const uint8_t *p, size_t n, PyObject **payload)
{
    FlowKey k;
    FlowEntry *e, *ie;
    EspCoreObject *c;
    SaCountersObject *s;
    OpenResult r;
    const uint8_t *inner;
    int verdict = PUNT;

    memset(&k, 0, sizeof(k));
    k.kind = KIND_INPUT_SA;
    k.proto = PROTO_ESP;
    k.spi = rd32(p + 20);
    memcpy(k.flow, p + 12, 8);
    e = table_find(fp, &k);
    if (e == NULL)
        return PUNT;
    c = e->core;
    s = c->counters;
    if (!sa_fast_allows(s, 0))
        return PUNT;
    Py_INCREF(c); /* decrypt() and on_drop may be Python code that empties the table */
    Py_INCREF(s);
    core_open(c, p, (Py_ssize_t)n, &r);
    if ((r.code == OPEN_REPLAY || r.code == OPEN_ICV) && fp->on_drop != NULL && fp->on_drop != Py_None) {
        /* the commonest attacks (replays, forgeries) are dropped here, counted as esp.py and the
         * pipeline would count them, so that a forged packet costs one AEAD call, not two */
        PyObject *res;
        if (r.code == OPEN_REPLAY)
            s->replay_drops++;
        else
            s->integrity_failures++;
        res = PyObject_CallFunction(fp->on_drop, "s",
                                    r.code == OPEN_REPLAY ? C_IN_STATE_SEQ_ERROR : C_IN_STATE_PROTO_ERROR);
        if (res == NULL)
            PyErr_Clear();
        Py_XDECREF(res);
        fp->dropped++;
        verdict = NF_DROP;
        goto out;
    }
    if (r.code != OPEN_OK) {
        if (r.code == OPEN_ERROR)
            PyErr_Clear();
        goto out; /* Python repeats the work and counts what is wrong */
    }
    inner = (const uint8_t *)PyBytes_AS_STRING(r.pt);
    memset(&k, 0, sizeof(k));
    k.kind = KIND_INNER;
    k.spi = c->spi;
    if (c->tunnel) {
        if (r.nh != PROTO_IPIP || r.inner_len < 24 || inner[0] != 0x45 || (inner[6] & 0x3f) || inner[7] ||
            rd16(inner + 2) != r.inner_len)
            goto out;
        k.proto = inner[9];
        memcpy(k.flow, inner + 12, 12);
    } else {
        if (r.end < 4)
            goto out;
        k.proto = (uint8_t)r.nh;
        memcpy(k.flow, p + 12, 8);
        memcpy(k.flow + 8, inner, 4);
    }
    ie = table_find(fp, &k);
    /* (the time limit was checked before decrypting; the length is only known now) */
    if (ie == NULL || ie->core != c || !s->fast_ok || !sa_volume_allows(s, (unsigned long long)r.inner_len))
        goto out;
    replay_update(c->replay, r.seq);
    s->packets++;
    s->bytes += (unsigned long long)r.inner_len;
    account_policies(ie, (unsigned long long)r.inner_len);
    fp->handled++;
    if (c->tunnel) {
        ssize_t w = write(fp->tun_fd, inner, (size_t)r.inner_len); /* non-blocking fd */
        if (w < 0)
            fp->tun_errors++;
        verdict = NF_DROP;
    } else {
        *payload = core_finish(p, &r, 0);
        if (*payload == NULL) {
            PyErr_Clear();
            verdict = NF_DROP; /* out of memory after committing: drop, as the Python path would fail */
        } else {
            verdict = NF_ACCEPT;
        }
    }
out:
    Py_XDECREF(r.pt);
    Py_DECREF(s);
    Py_DECREF(c);
    return verdict;
}

/*
 * The NFQUEUE binding's entry point: PUNT (-1) to hand the packet to Python, else the verdict
 * (NF_ACCEPT with *payload set: accept this replacement). Never leaves an exception set.
 */
static int
fastpath_handle(PyObject *obj, int hook, const unsigned char *p, size_t n, unsigned int indev, PyObject **payload)
{
    FastPathObject *fp = (FastPathObject *)obj;

    *payload = NULL;
    if (!fp->enabled || fp->count == 0 || n < 24 || p[0] != 0x45 || rd16(p + 2) != n || (p[6] & 0x3f) || p[7])
        return PUNT;
    if (hook == HOOK_FORWARD || hook == HOOK_OUTPUT) {
        if (hook == HOOK_FORWARD && indev == fp->tun_ifindex)
            return PUNT;
        return fast_protect(fp, hook, p, n);
    }
    if (hook == HOOK_INPUT && p[9] == PROTO_ESP && n >= 20 + ESP_MIN_LEN)
        return fast_unprotect(fp, p, n, payload);
    return PUNT;
}

/* handle(hook, packet, indev=0) -> None (Python's turn) | verdict | (verdict, payload): for tests. */
static PyObject *
FastPath_handle(FastPathObject *self, PyObject *args)
{
    int hook;
    PyObject *indev_obj = NULL;
    uint64_t indev = 0;
    Py_buffer view;
    PyObject *payload = NULL;
    int v;

    if (!PyArg_ParseTuple(args, "iy*|O", &hook, &view, &indev_obj))
        return NULL;
    if (indev_obj != NULL && (parse_u64(indev_obj, &indev, "indev") < 0 || indev > 0xffffffffULL)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "indev out of range");
        PyBuffer_Release(&view);
        return NULL;
    }
    if (self->table == NULL) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "FastPath is not initialised");
        return NULL;
    }
    v = fastpath_handle((PyObject *)self, hook, view.buf, (size_t)view.len, (unsigned int)indev, &payload);
    PyBuffer_Release(&view);
    if (v == PUNT)
        Py_RETURN_NONE;
    if (payload != NULL) {
        PyObject *t = Py_BuildValue("(iN)", v, payload);
        return t;
    }
    return PyLong_FromLong(v);
}

static PyObject *
FastPath_stats(FastPathObject *self, PyObject *unused)
{
    return Py_BuildValue("{sKsKsKsKsKsI}", "packets", self->handled, "dropped", self->dropped, "send_errors",
                         self->send_errors, "tun_errors", self->tun_errors, "table_full", self->full, "flows",
                         self->count);
}

static PyMethodDef FastPath_methods[] = {
    {"learn", (PyCFunction)FastPath_learn, METH_VARARGS,
     "learn(kind, proto, spi, flow, core, policies, max_len) -> bool: remember one decision."},
    {"clear", (PyCFunction)FastPath_clear_method, METH_NOARGS, "Forget every flow (the SPD or SAD changed)."},
    {"handle", (PyCFunction)FastPath_handle, METH_VARARGS,
     "handle(hook, packet, indev=0) -> None | verdict | (verdict, payload); what the binding calls."},
    {"stats", (PyCFunction)FastPath_stats, METH_NOARGS, "Counters of the fast path."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FastPath_members[] = {
    {"enabled", T_BOOL, offsetof(FastPathObject, enabled), 0, "Off: every packet goes to Python."},
    {"on_drop", T_OBJECT, offsetof(FastPathObject, on_drop), 0,
     "on_drop(counter_name): called for each replayed or forged ESP packet of a known SA the fast path "
     "drops itself; None: such packets go to Python."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastPath_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nfq_ipsec._espcore.FastPath",
    .tp_basicsize = sizeof(FastPathObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FastPath(raw_fd, tun_fd, tun_ifindex): the engine's table of decided flows.",
    .tp_init = (initproc)FastPath_init,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear_refs,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
};

/* ================================ module ================================ */

/* What the NFQUEUE binding imports (PyCapsule_Import("nfq_ipsec._espcore._FASTPATH_API")). */
typedef struct {
    int (*handle)(PyObject *fp, int hook, const unsigned char *p, size_t n, unsigned int indev, PyObject **payload);
    PyTypeObject *type;
} FastPathApi;

static FastPathApi fastpath_api = {fastpath_handle, &FastPath_Type};

static struct PyModuleDef espcore_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nfq_ipsec._espcore",
    .m_doc = "ESP AEAD framing, anti-replay window and the engine's fast path, in C (see _espcore.c).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__espcore(void)
{
    PyObject *m;
    PyTypeObject *types[] = {&SaCounters_Type, &CounterPair_Type, &EspCore_Type, &FastPath_Type};
    const char *names[] = {"SaCounters", "CounterPair", "EspCore", "FastPath"};
    PyObject *capsule;

    if (getrandom(&next_ip_id, sizeof(next_ip_id), 0) != sizeof(next_ip_id))
        next_ip_id = (uint16_t)getpid();
    m = PyModule_Create(&espcore_module);
    if (m == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0 || PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (replay_module_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    capsule = PyCapsule_New(&fastpath_api, "nfq_ipsec._espcore._FASTPATH_API", NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_FASTPATH_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "KIND_INPUT_SA", KIND_INPUT_SA) < 0 ||
        PyModule_AddIntConstant(m, "KIND_FORWARD", KIND_FORWARD) < 0 ||
        PyModule_AddIntConstant(m, "KIND_OUTPUT", KIND_OUTPUT) < 0 ||
        PyModule_AddIntConstant(m, "KIND_INNER", KIND_INNER) < 0 ||
        PyModule_AddStringConstant(m, "C_IN_STATE_SEQ_ERROR", C_IN_STATE_SEQ_ERROR) < 0 ||
        PyModule_AddStringConstant(m, "C_IN_STATE_PROTO_ERROR", C_IN_STATE_PROTO_ERROR) < 0 ||
        PyModule_AddStringConstant(m, "C_IN_STATE_MODE_ERROR", C_IN_STATE_MODE_ERROR) < 0 ||
        PyModule_AddStringConstant(m, "C_IN_PADDING_ERROR", C_IN_PADDING_ERROR) < 0 ||
        PyModule_AddStringConstant(m, "C_IN_DUMMY_PACKET", C_IN_DUMMY_PACKET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
