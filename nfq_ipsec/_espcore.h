/*
 * _espcore: the per-packet work of an ESP AEAD SA in C (sans-I/O except the engine fast path).
 *
 * Shared declarations between the translation units of the nfq_ipsec._espcore extension:
 * _replaywin.c (the anti-replay window) and _espcore.c (SA state, ESP framing, fast path).
 */
#ifndef NFQ_IPSEC_ESPCORE_H
#define NFQ_IPSEC_ESPCORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* ---- anti-replay window (RFC 4303 §3.4.3, RFC 6479 bitmap, ESN inference of App. A2) ---- */

typedef struct {
    PyObject_HEAD
    uint32_t size;     /* window size in packets; 0 = anti-replay off */
    int esn;           /* 64-bit sequence numbers, high half inferred */
    uint64_t top;      /* highest sequence number recorded */
    uint64_t *ring;    /* ring of 64-bit words: bit (seq % (64 * nwords)) = seq seen */
    uint32_t ring_mask; /* nwords - 1 (nwords a power of two, >= size/64 + 1 spare word) */
} ReplayWindowObject;

extern PyTypeObject ReplayWindow_Type;

enum { REPLAY_OK = 0, REPLAY_ZERO = 1, REPLAY_OLD = 2, REPLAY_DUP = 3 };

/* Before the ICV: REPLAY_OK and the full sequence number in *seq, or why it is rejected.
 * With size 0 every value is accepted (*seq = seq_low). */
int replay_check(ReplayWindowObject *w, uint32_t seq_low, uint64_t *seq);
/* After the ICV verified: record *seq (the value replay_check gave). */
void replay_update(ReplayWindowObject *w, uint64_t seq);
/* The reason text of a rejection ("sequence number 0", "outside window", "replayed"). */
const char *replay_reason(int code);
/* Adds ReplayWindow to the module; 0 on success, -1 with an exception set. */
int replay_module_init(PyObject *module);

/* Raise nfq_ipsec.errors.Drop(counter, reason); always returns NULL. */
PyObject *espcore_raise_drop(const char *counter, const char *reason);

#endif
