/*
 * _replaywin: the anti-replay window of an inbound SA (RFC 4303 §3.4.3, RFC 4302 §3.4.3) with the
 * ESN inference of RFC 4303 Appendix A2, part of the nfq_ipsec._espcore extension.
 *
 * Why C: the window is consulted twice per inbound packet (check before the ICV, update after),
 * from Python (esp.py, ah.py) and from the C fast path in _espcore.c, which calls replay_check()
 * and replay_update() directly. tests/unit/replay_model.py is the executable specification this
 * file is checked against (tests/unit/test_replay_c.py), message for message.
 *
 * One layout for every size, the ring of RFC 6479: bit (seq % (64 * nwords)) says whether seq was
 * seen. Advancing only clears the words that slide in (a jump of more than the ring clears the
 * ring once), so a packet costs O(1) and nothing is allocated after construction. nwords is the
 * smallest power of two >= size/64 rounded up + 1: the spare word keeps the word holding the
 * oldest in-window sequence number from being the one an advance clears.
 */
#include "_espcore.h"

#include <string.h>
#include <structmember.h>

#define REPLAY_MAX_WINDOW 65536 /* nfq_ipsec.replay.MAX_WINDOW (test_replay_c.py checks they agree) */
#define REPLAY_COUNTER "XfrmInStateSeqError" /* nfq_ipsec.counters.XFRM_IN_STATE_SEQ_ERROR (idem) */
#define MASK32 0xFFFFFFFFULL

/* ---- the C API (_espcore.h): no Python objects, no allocation, never fails ---- */

/* RFC 4303 App. A2.2: the full sequence number for a received low half; 0 if impossible (below 0 or
 * above 2^64-1), else 1 with the value in *seq. Without ESN the low half is the sequence number. */
static int
replay_infer(const ReplayWindowObject *w, uint32_t seq_low, uint64_t *seq)
{
    uint64_t tl = w->top & MASK32, size = w->size;
    int64_t th = (int64_t)(w->top >> 32);

    if (!w->esn) {
        *seq = seq_low;
        return 1;
    }
    if (tl + 1 >= size) {
        /* case A: the window lies within one 2^32 subspace */
        if (seq_low < tl + 1 - size)
            th += 1;
    } else if (seq_low >= ((tl + 1 - size) & MASK32)) {
        /* case B: the window straddles a 2^32 boundary (unsigned wrap = Python's & MASK32) */
        th -= 1;
    }
    if (th < 0 || th > (int64_t)MASK32)
        return 0;
    *seq = ((uint64_t)th << 32) | seq_low;
    return 1;
}

static inline int
replay_bit(const ReplayWindowObject *w, uint64_t seq)
{
    return (int)((w->ring[(seq >> 6) & w->ring_mask] >> (seq & 63)) & 1);
}

int
replay_check(ReplayWindowObject *w, uint32_t seq_low, uint64_t *seq)
{
    uint64_t s;

    *seq = seq_low; /* defined even on rejection */
    if (!w->size)
        return REPLAY_OK; /* anti-replay off: "no inbound checks are performed" (RFC 4303 §3.4.3) */
    if (!replay_infer(w, seq_low, &s))
        return REPLAY_OLD;
    if (s == 0)
        return REPLAY_ZERO;
    *seq = s;
    if (s > w->top)
        return REPLAY_OK;
    if (w->top - s >= w->size)
        return REPLAY_OLD;
    return replay_bit(w, s) ? REPLAY_DUP : REPLAY_OK;
}

void
replay_update(ReplayWindowObject *w, uint64_t seq)
{
    uint64_t top = w->top, word, steps, bit = 1ULL << (seq & 63);
    uint32_t mask = w->ring_mask;

    if (seq > top) {
        w->top = seq;
        if (!w->size)
            return;
        word = seq >> 6;
        steps = word - (top >> 6);
        if (steps > mask) {
            memset(w->ring, 0, ((size_t)mask + 1) * sizeof(uint64_t));
        } else {
            /* the words sliding into the window start empty (the spare word keeps the oldest intact) */
            for (uint64_t k = word - steps + 1; k <= word; k++)
                w->ring[k & mask] = 0;
        }
        w->ring[word & mask] |= bit;
    } else if (top - seq < w->size) {
        w->ring[(seq >> 6) & mask] |= bit;
    }
    /* else: disabled window, or fell out of the window meanwhile: nothing to remember */
}

const char *
replay_reason(int code)
{
    switch (code) {
    case REPLAY_ZERO:
        return "sequence number 0";
    case REPLAY_OLD:
        return "outside window";
    case REPLAY_DUP:
        return "replayed";
    default:
        return "accepted";
    }
}

/* ---- the Python type ---- */

/* 1 with the value in *out if arg is an int (bool excluded) in 0..max, 0 if it is not (no exception set),
 * -1 on any other error. Never truncates. */
static int
bounded_int(PyObject *arg, uint64_t max, uint64_t *out)
{
    unsigned long long v;

    if (!PyLong_Check(arg) || PyBool_Check(arg))
        return 0;
    v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear(); /* negative or above 2^64-1 */
        return 0;
    }
    if (v > max)
        return 0;
    *out = v;
    return 1;
}

/* A sequence number argument: TypeError if not an int, ValueError if outside 0..max. A bool passes as
 * 0 or 1, as it does in Python arithmetic (the reference model accepts it). */
static int
seq_arg(PyObject *arg, uint64_t max, const char *name, uint64_t *out)
{
    int rc;

    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.100s", name, Py_TYPE(arg)->tp_name);
        return -1;
    }
    if (PyBool_Check(arg)) {
        *out = arg == Py_True;
        return 0;
    }
    rc = bounded_int(arg, max, out);
    if (rc == 0)
        PyErr_Format(PyExc_ValueError, "%s must be an integer in 0..%llu, got %R", name, (unsigned long long)max,
                     arg);
    return rc > 0 ? 0 : -1;
}

static PyObject *
ReplayWindow_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", "esn", "initial", NULL};
    PyObject *size_obj, *esn_obj = Py_False, *initial_obj = NULL;
    ReplayWindowObject *self;
    uint64_t size = 0, initial = 0, limit, nwords;
    int esn, rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:ReplayWindow", kwlist, &size_obj, &esn_obj, &initial_obj))
        return NULL;
    rc = bounded_int(size_obj, REPLAY_MAX_WINDOW, &size); /* bools and floats are mistakes here */
    if (rc <= 0) {
        if (rc == 0)
            PyErr_Format(PyExc_ValueError, "replay window size must be an integer in 0..%d, got %R",
                         REPLAY_MAX_WINDOW, size_obj);
        return NULL;
    }
    esn = PyObject_IsTrue(esn_obj);
    if (esn < 0)
        return NULL;
    if (esn && size == 0) {
        PyErr_SetString(PyExc_ValueError, "replay window size must be > 0 with ESN (as Linux requires)");
        return NULL;
    }
    limit = esn ? UINT64_MAX : MASK32;
    if (initial_obj != NULL) {
        rc = bounded_int(initial_obj, limit, &initial);
        if (rc <= 0) {
            if (rc == 0)
                PyErr_Format(PyExc_ValueError, "initial sequence number must be in 0..%llu, got %R",
                             (unsigned long long)limit, initial_obj);
            return NULL;
        }
    }
    self = (ReplayWindowObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->size = (uint32_t)size;
    self->esn = esn;
    self->top = initial;
    self->ring = NULL; /* size 0: no bitmap, every function tests size first */
    self->ring_mask = 0;
    if (size > 0) {
        nwords = 1;
        while (nwords < (size + 63) / 64 + 1)
            nwords <<= 1;
        self->ring = PyMem_Calloc(nwords, sizeof(uint64_t));
        if (self->ring == NULL) {
            Py_DECREF(self);
            return PyErr_NoMemory();
        }
        self->ring_mask = (uint32_t)(nwords - 1);
    }
    return (PyObject *)self;
}

static void
ReplayWindow_dealloc(ReplayWindowObject *self)
{
    PyMem_Free(self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
ReplayWindow_repr(ReplayWindowObject *self)
{
    return PyUnicode_FromFormat("ReplayWindow(size=%u, esn=%s, top=%llu)", (unsigned int)self->size,
                                self->esn ? "True" : "False", (unsigned long long)self->top);
}

static PyObject *
ReplayWindow_infer(ReplayWindowObject *self, PyObject *arg)
{
    uint64_t seq_low, seq;

    if (seq_arg(arg, MASK32, "seq_low", &seq_low) < 0)
        return NULL;
    if (!replay_infer(self, (uint32_t)seq_low, &seq))
        return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLongLong(seq);
}

static PyObject *
ReplayWindow_check(ReplayWindowObject *self, PyObject *arg)
{
    uint64_t seq_low, seq;
    int code;

    if (seq_arg(arg, MASK32, "seq_low", &seq_low) < 0)
        return NULL;
    code = replay_check(self, (uint32_t)seq_low, &seq);
    if (code != REPLAY_OK)
        return espcore_raise_drop(REPLAY_COUNTER, replay_reason(code));
    return PyLong_FromUnsignedLongLong(seq);
}

static PyObject *
ReplayWindow_update(ReplayWindowObject *self, PyObject *arg)
{
    uint64_t seq;

    if (seq_arg(arg, UINT64_MAX, "seq", &seq) < 0)
        return NULL;
    replay_update(self, seq);
    Py_RETURN_NONE;
}

static PyObject *
ReplayWindow_seen(ReplayWindowObject *self, PyObject *arg)
{
    uint64_t seq;

    if (seq_arg(arg, UINT64_MAX, "seq", &seq) < 0)
        return NULL;
    if (self->size == 0 || seq > self->top || self->top - seq >= self->size)
        Py_RETURN_FALSE;
    return PyBool_FromLong(replay_bit(self, seq));
}

static PyObject *
ReplayWindow_get_esn(ReplayWindowObject *self, void *closure)
{
    return PyBool_FromLong(self->esn);
}

static PyMethodDef ReplayWindow_methods[] = {
    {"infer", (PyCFunction)ReplayWindow_infer, METH_O,
     "infer(seq_low) -> the full 64-bit sequence number for a received low half (RFC 4303 App. A2.2).\n\n"
     "-1 when the inferred value is impossible (below 1 or above 2^64-1). Without ESN the received value is\n"
     "the sequence number itself."},
    {"check", (PyCFunction)ReplayWindow_check, METH_O,
     "check(seq_low) -> full sequence number. Rejects duplicates and too-old packets before the ICV:\n"
     "raises nfq_ipsec.errors.Drop(XfrmInStateSeqError, reason). Never moves the window."},
    {"update", (PyCFunction)ReplayWindow_update, METH_O,
     "update(seq): record seq (the value check() returned) once its ICV verified."},
    {"seen", (PyCFunction)ReplayWindow_seen, METH_O,
     "seen(seq) -> whether seq (full value) is recorded in the window (for tests and diagnostics)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef ReplayWindow_members[] = {
    {"size", T_UINT, offsetof(ReplayWindowObject, size), READONLY, "window size in packets (0: anti-replay off)"},
    {"top", T_ULONGLONG, offsetof(ReplayWindowObject, top), READONLY, "highest sequence number recorded"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef ReplayWindow_getset[] = {
    {"esn", (getter)ReplayWindow_get_esn, NULL, "64-bit sequence numbers, high half inferred (RFC 4303 App. A2)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ReplayWindow_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nfq_ipsec._espcore.ReplayWindow",
    .tp_basicsize = sizeof(ReplayWindowObject),
    .tp_dealloc = (destructor)ReplayWindow_dealloc,
    .tp_repr = (reprfunc)ReplayWindow_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ReplayWindow(size, esn=False, initial=0): sliding window of accepted sequence numbers for one\n"
              "inbound SA.\n\n"
              "size 0 disables replay protection (every packet is accepted, duplicates and 0 included: RFC 4303\n"
              "§3.4.3 \"no inbound checks\", as `replay-window 0` does in Linux). ESN needs a window (Linux\n"
              "refuses ESN without one, and A2.2 infers the high bits relative to it). initial is the starting\n"
              "top: sequence numbers in (initial - size, initial] are still accepted once (the bitmap starts\n"
              "empty, as in Linux when the state is installed with a given seq). Use check() before the ICV,\n"
              "update() only once it verified, so forged packets can never move the window.",
    .tp_methods = ReplayWindow_methods,
    .tp_members = ReplayWindow_members,
    .tp_getset = ReplayWindow_getset,
    .tp_new = ReplayWindow_new,
};

int
replay_module_init(PyObject *module)
{
    if (PyType_Ready(&ReplayWindow_Type) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "ReplayWindow", (PyObject *)&ReplayWindow_Type);
}
