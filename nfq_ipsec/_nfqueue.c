/*
 * _nfqueue: a minimal NFQUEUE binding that always hands Python the WHOLE packet.
 *
 * Why our own binding: NetfilterQueue copies at most ~4 KB of a packet, but INPUT sees
 * reassembled datagrams and OUTPUT sees datagrams before fragmentation (up to 64 KB).  An IPsec
 * engine that re-injected a truncated copy would corrupt traffic, so here:
 *   - copy mode is NFQNL_COPY_PACKET with the largest range the kernel allows (65531 bytes:
 *     a netlink attribute length is 16 bits including its 4-byte header);
 *   - a packet whose copy is short anyway (NFQA_CAP_LEN present, or no payload) is dropped
 *     and counted, never shown to the callback nor accepted;
 *   - NFQA_CFG_F_GSO is cleared, so the kernel segments GSO skbs and completes
 *     CHECKSUM_PARTIAL checksums before copying: the callback sees wire-valid packets.
 *
 * Hot path (process()): non-blocking recv() into a preallocated buffer with the GIL released,
 * attributes parsed in place, one bytes object for the payload, one vectorcall, one sendto()
 * for the verdict.  With batch_verdicts=True the verdicts of one process() call go out in a
 * single sendto() at its end instead (netlink_rcv_skb() processes every message of a datagram;
 * an error on one is acked and the others still run) -- faster, but a packet the callback
 * accepts then leaves after anything the callback sent itself meanwhile (e.g. through a raw
 * socket); off by default. The engine turns it on: its protected packets all get DROP verdicts
 * and leave through its raw socket in callback order (see nfqueue.py).
 *
 * fastpath: an nfq_ipsec._espcore.FastPath (through its capsule) is offered each packet first;
 * a packet it handles (a flow the engine has decided already) never enters Python.
 *
 * Only libmnl (socket helpers) and the kernel uapi headers are needed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>

/* Largest payload a netlink attribute can carry (nla_len is 16 bits and counts the header). */
#define NFQ_MAX_PAYLOAD (0xffff - NLA_HDRLEN)
/* Room for the largest packet message: payload + nlmsghdr/nfgenmsg + all other attributes. */
#define RECV_BUF_SIZE (NFQ_MAX_PAYLOAD + 16384)
/* Verdict batch buffer: must hold at least one verdict with a full-size payload. */
#define VERDICT_MSG_OVERHEAD (NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg)) + \
                              NLA_HDRLEN + NLA_ALIGN(sizeof(struct nfqnl_msg_verdict_hdr)) + NLA_HDRLEN)
#define SEND_BUF_SIZE (2 * (NFQ_MAX_PAYLOAD + 64) + 4096)
#define PACKET_MSG_TYPE ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)

typedef struct {
    PyObject_HEAD
    struct mnl_socket *nl;
    int fd;
    unsigned int queue_num;
    unsigned int portid;
    unsigned int seq;
    int in_process;
    int close_requested;
    int batch_verdicts;
    char *rbuf;
    char *sbuf;
    size_t sbuf_used;
    unsigned int sbuf_msgs;
    /* the engine's fast path (nfq_ipsec._espcore.FastPath), consulted before the callback */
    PyObject *fast;
    int (*fast_handle)(PyObject *fp, int hook, const unsigned char *p, size_t n, unsigned int indev,
                       PyObject **payload);
    /* statistics */
    unsigned long long packets, accepted, dropped, mangled, truncated, enobufs, callback_errors, verdict_errors,
        fast_packets;
} NfQueueObject;

/* What nfq_ipsec._espcore exports as the capsule "_FASTPATH_API" (same layout as there). */
typedef struct {
    int (*handle)(PyObject *fp, int hook, const unsigned char *p, size_t n, unsigned int indev, PyObject **payload);
    PyTypeObject *type;
} FastPathApi;

/* ---------- netlink message builders ---------- */

static struct nlmsghdr *
put_queue_header(char *buf, uint16_t type, unsigned int queue_num, uint16_t flags, unsigned int seq)
{
    struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
    struct nfgenmsg *nfg;

    nlh->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | type;
    nlh->nlmsg_flags = NLM_F_REQUEST | flags;
    nlh->nlmsg_seq = seq;
    nfg = mnl_nlmsg_put_extra_header(nlh, sizeof(*nfg));
    nfg->nfgen_family = AF_UNSPEC;
    nfg->version = NFNETLINK_V0;
    nfg->res_id = htons((uint16_t)queue_num);
    return nlh;
}

/* Append a verdict (optionally with a replacement payload) to the batch buffer. */
static void
append_verdict(NfQueueObject *self, uint32_t packet_id, uint32_t verdict, const void *pkt, size_t pkt_len)
{
    struct nlmsghdr *nlh = put_queue_header(self->sbuf + self->sbuf_used, NFQNL_MSG_VERDICT,
                                            self->queue_num, 0, 0);
    struct nfqnl_msg_verdict_hdr vh;

    vh.verdict = htonl(verdict);
    vh.id = htonl(packet_id);
    mnl_attr_put(nlh, NFQA_VERDICT_HDR, sizeof(vh), &vh);
    if (pkt != NULL)
        mnl_attr_put(nlh, NFQA_PAYLOAD, pkt_len, pkt);
    self->sbuf_used += NLMSG_ALIGN(nlh->nlmsg_len);
    self->sbuf_msgs++;
}

/* Send all batched verdicts.  Called with the GIL held; a failed send counts every lost verdict. */
static void
flush_verdicts(NfQueueObject *self)
{
    ssize_t n;
    size_t len = self->sbuf_used;

    if (len == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    do {
        n = mnl_socket_sendto(self->nl, self->sbuf, len);
    } while (n < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    if (n < 0 || (size_t)n != len)
        self->verdict_errors += self->sbuf_msgs;
    self->sbuf_used = 0;
    self->sbuf_msgs = 0;
}

static void
ensure_room(NfQueueObject *self, size_t pkt_len)
{
    size_t need = VERDICT_MSG_OVERHEAD + NLA_ALIGN(pkt_len) + 16;

    if (self->sbuf_used + need > SEND_BUF_SIZE)
        flush_verdicts(self);
}

/* ---------- setup / teardown ---------- */

/* Send one config message and wait for its ack; returns 0 or -errno.  Packet messages that
 * arrive meanwhile (the queue exists before its copy mode is set) are dropped as truncated. */
static int
config_request(NfQueueObject *self, struct nlmsghdr *nlh)
{
    ssize_t n;
    int remaining;
    unsigned int seq = nlh->nlmsg_seq;

    if (mnl_socket_sendto(self->nl, nlh, nlh->nlmsg_len) < 0)
        return -errno;
    for (;;) {
        n = recv(self->fd, self->rbuf, RECV_BUF_SIZE, 0);
        if (n < 0) {
            if (errno == EINTR || errno == ENOBUFS)
                continue;
            return -errno;
        }
        remaining = (int)(n > RECV_BUF_SIZE ? RECV_BUF_SIZE : n);
        for (struct nlmsghdr *m = (struct nlmsghdr *)self->rbuf; mnl_nlmsg_ok(m, remaining);
             m = mnl_nlmsg_next(m, &remaining)) {
            if (m->nlmsg_type == NLMSG_ERROR && m->nlmsg_seq == seq) {
                const struct nlmsgerr *err = mnl_nlmsg_get_payload(m);
                int rc = err->error;

                flush_verdicts(self);
                return rc;
            }
            if (m->nlmsg_type == PACKET_MSG_TYPE) {
                struct nlattr *a;
                mnl_attr_for_each(a, m, sizeof(struct nfgenmsg)) {
                    if (mnl_attr_get_type(a) == NFQA_PACKET_HDR &&
                        mnl_attr_get_payload_len(a) >= sizeof(struct nfqnl_msg_packet_hdr)) {
                        const struct nfqnl_msg_packet_hdr *ph = mnl_attr_get_payload(a);
                        ensure_room(self, 0);
                        append_verdict(self, ntohl(ph->packet_id), NF_DROP, NULL, 0);
                        self->packets++;
                        self->truncated++;
                        self->dropped++;
                    }
                }
            }
        }
    }
}

static void
close_socket(NfQueueObject *self)
{
    if (self->nl != NULL) {
        char buf[256];
        struct nlmsghdr *nlh;
        struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_UNBIND, .pf = 0};

        flush_verdicts(self);
        /* Explicit unbind (closing the socket would also destroy the queue instance). */
        nlh = put_queue_header(buf, NFQNL_MSG_CONFIG, self->queue_num, 0, ++self->seq);
        mnl_attr_put(nlh, NFQA_CFG_CMD, sizeof(cmd), &cmd);
        (void)mnl_socket_sendto(self->nl, nlh, nlh->nlmsg_len);
        mnl_socket_close(self->nl);
        self->nl = NULL;
        self->fd = -1;
    }
    PyMem_Free(self->rbuf);
    PyMem_Free(self->sbuf);
    self->rbuf = NULL;
    self->sbuf = NULL;
}

static void
set_bufsize(int fd, int force_opt, int opt, int size)
{
    /* The FORCE variant (root) ignores rmem_max/wmem_max; fall back to the capped one. */
    if (setsockopt(fd, SOL_SOCKET, force_opt, &size, sizeof(size)) < 0)
        (void)setsockopt(fd, SOL_SOCKET, opt, &size, sizeof(size));
}

static int
NfQueue_init(NfQueueObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"queue_num", "maxlen", "fail_open", "rcvbuf", "batch_verdicts", NULL};
    unsigned int queue_num;
    unsigned int maxlen = 8192;
    int fail_open = 0;
    int rcvbuf = 8 << 20;
    char buf[512];
    struct nlmsghdr *nlh;
    int rc;

    int batch_verdicts = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "I|$Ipip:NfQueue", kwlist, &queue_num, &maxlen, &fail_open,
                                     &rcvbuf, &batch_verdicts))
        return -1;
    if (self->nl != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "NfQueue is already initialised");
        return -1;
    }
    if (queue_num > 65535) {
        PyErr_Format(PyExc_ValueError, "queue_num must be 0..65535, got %u", queue_num);
        return -1;
    }
    if (maxlen == 0) {
        PyErr_SetString(PyExc_ValueError, "maxlen must be at least 1");
        return -1;
    }
    if (rcvbuf < 262144) /* must hold at least one full-size packet message */
        rcvbuf = 262144;

    self->queue_num = queue_num;
    self->batch_verdicts = batch_verdicts;
    self->rbuf = PyMem_Malloc(RECV_BUF_SIZE);
    self->sbuf = PyMem_Malloc(SEND_BUF_SIZE);
    if (self->rbuf == NULL || self->sbuf == NULL) {
        close_socket(self);
        PyErr_NoMemory();
        return -1;
    }
    self->nl = mnl_socket_open(NETLINK_NETFILTER);
    if (self->nl == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        close_socket(self);
        return -1;
    }
    self->fd = mnl_socket_get_fd(self->nl);
    if (mnl_socket_bind(self->nl, 0, MNL_SOCKET_AUTOPID) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close_socket(self);
        return -1;
    }
    self->portid = mnl_socket_get_portid(self->nl);
    set_bufsize(self->fd, SO_RCVBUFFORCE, SO_RCVBUF, rcvbuf);
    set_bufsize(self->fd, SO_SNDBUFFORCE, SO_SNDBUF, 4 * SEND_BUF_SIZE);

    /* One config message: bind, copy the whole packet, queue length, flags (FAIL_OPEN only if
     * asked; GSO explicitly cleared so the kernel segments and finishes checksums). */
    {
        struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_BIND, .pf = 0};
        struct nfqnl_msg_config_params params = {.copy_range = htonl(0xffff), .copy_mode = NFQNL_COPY_PACKET};
        uint32_t mask = htonl(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO);
        uint32_t flags = htonl(fail_open ? NFQA_CFG_F_FAIL_OPEN : 0);

        nlh = put_queue_header(buf, NFQNL_MSG_CONFIG, queue_num, NLM_F_ACK, ++self->seq);
        mnl_attr_put(nlh, NFQA_CFG_CMD, sizeof(cmd), &cmd);
        mnl_attr_put(nlh, NFQA_CFG_PARAMS, sizeof(params), &params);
        mnl_attr_put_u32(nlh, NFQA_CFG_QUEUE_MAXLEN, htonl(maxlen));
        mnl_attr_put(nlh, NFQA_CFG_MASK, sizeof(mask), &mask);
        mnl_attr_put(nlh, NFQA_CFG_FLAGS, sizeof(flags), &flags);
    }
    rc = config_request(self, nlh);
    if (rc != 0) {
        /* errno is kept (EPERM/EBUSY: the queue is bound by someone else, or no CAP_NET_ADMIN);
         * nfq_ipsec.nfqueue turns it into a message that says which. */
        char msg[160];
        PyObject *exc;

        snprintf(msg, sizeof(msg), "cannot bind NFQUEUE queue %u: %s", queue_num, strerror(-rc));
        exc = PyObject_CallFunction(PyExc_OSError, "is", -rc, msg);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        close_socket(self);
        return -1;
    }
    return 0;
}

static void
NfQueue_dealloc(NfQueueObject *self)
{
    Py_CLEAR(self->fast);
    close_socket(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---------- hot path ---------- */

typedef struct {
    uint32_t id;
    int have_hdr;
    uint8_t hook;
    uint32_t mark, indev, outdev, cap_len;
    const unsigned char *payload;
    size_t payload_len;
    int have_payload;
} PacketMsg;

/* Parse the attributes of a packet message, reading at most `avail` bytes of it. */
static void
parse_packet(const struct nlmsghdr *nlh, size_t avail, PacketMsg *pm)
{
    const char *p = (const char *)nlh + NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg));
    const char *end = (const char *)nlh + (nlh->nlmsg_len < avail ? nlh->nlmsg_len : avail);

    memset(pm, 0, sizeof(*pm));
    while (p + NLA_HDRLEN <= end) {
        const struct nlattr *a = (const struct nlattr *)p;
        size_t alen = a->nla_len;
        const char *data = p + NLA_HDRLEN;
        size_t dlen;

        if (alen < NLA_HDRLEN || p + alen > end)
            break;
        dlen = alen - NLA_HDRLEN;
        switch (a->nla_type & NLA_TYPE_MASK) {
        case NFQA_PACKET_HDR:
            if (dlen >= sizeof(struct nfqnl_msg_packet_hdr)) {
                const struct nfqnl_msg_packet_hdr *ph = (const void *)data;
                pm->id = ntohl(ph->packet_id);
                pm->hook = ph->hook;
                pm->have_hdr = 1;
            }
            break;
        case NFQA_MARK:
            if (dlen >= 4)
                pm->mark = ntohl(*(const uint32_t *)data);
            break;
        case NFQA_IFINDEX_INDEV:
            if (dlen >= 4)
                pm->indev = ntohl(*(const uint32_t *)data);
            break;
        case NFQA_IFINDEX_OUTDEV:
            if (dlen >= 4)
                pm->outdev = ntohl(*(const uint32_t *)data);
            break;
        case NFQA_CAP_LEN:
            if (dlen >= 4)
                pm->cap_len = ntohl(*(const uint32_t *)data);
            break;
        case NFQA_PAYLOAD:
            pm->payload = (const unsigned char *)data;
            pm->payload_len = dlen;
            pm->have_payload = 1;
            break;
        default:
            break;
        }
        p += NLA_ALIGN(alen);
    }
}

/* Turn the callback's result into a verdict; returns -1 (exception set) if it is malformed. */
static int
apply_result(NfQueueObject *self, uint32_t id, PyObject *res)
{
    long v;
    PyObject *vobj = res;
    PyObject *pobj = NULL;

    if (PyTuple_CheckExact(res)) {
        if (PyTuple_GET_SIZE(res) != 2) {
            PyErr_SetString(PyExc_TypeError, "callback must return a verdict or (verdict, payload)");
            return -1;
        }
        vobj = PyTuple_GET_ITEM(res, 0);
        pobj = PyTuple_GET_ITEM(res, 1);
    }
    if (!PyLong_Check(vobj)) {
        PyErr_Format(PyExc_TypeError, "callback verdict must be NF_DROP or NF_ACCEPT, got %.50s",
                     Py_TYPE(vobj)->tp_name);
        return -1;
    }
    v = PyLong_AsLong(vobj);
    if (v != NF_DROP && v != NF_ACCEPT) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "callback verdict must be NF_DROP (0) or NF_ACCEPT (1), got %ld", v);
        return -1;
    }
    if (pobj != NULL && pobj != Py_None) {
        Py_buffer view;

        if (PyObject_GetBuffer(pobj, &view, PyBUF_SIMPLE) < 0)
            return -1;
        if (view.len < 20 || view.len > NFQ_MAX_PAYLOAD) {
            PyErr_Format(PyExc_ValueError, "replacement packet must be 20..%d bytes, got %zd", NFQ_MAX_PAYLOAD,
                         view.len);
            PyBuffer_Release(&view);
            return -1;
        }
        ensure_room(self, (size_t)view.len);
        append_verdict(self, id, (uint32_t)v, view.buf, (size_t)view.len);
        PyBuffer_Release(&view);
        if (v == NF_ACCEPT)
            self->mangled++;
    } else {
        ensure_room(self, 0);
        append_verdict(self, id, (uint32_t)v, NULL, 0);
    }
    if (v == NF_ACCEPT)
        self->accepted++;
    else
        self->dropped++;
    return 0;
}

/* Drop a packet the callback must not see or whose callback failed. */
static void
verdict_drop(NfQueueObject *self, uint32_t id)
{
    ensure_room(self, 0);
    append_verdict(self, id, NF_DROP, NULL, 0);
    self->dropped++;
}

static PyObject *
NfQueue_process(NfQueueObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"callback", "max_packets"};
    PyObject *callback = NULL;
    long max_packets = 64;
    long handled = 0;
    int failed = 0;

    /* Tiny manual argument parser: process() is called once per poll wakeup. */
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "process() takes at most 2 arguments");
        return NULL;
    }
    if (nargs >= 1)
        callback = args[0];
    if (nargs == 2) {
        max_packets = PyLong_AsLong(args[1]);
        if (max_packets == -1 && PyErr_Occurred())
            return NULL;
    }
    if (kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i);
            PyObject *v = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(k, names[0]) == 0 && callback == NULL)
                callback = v;
            else if (PyUnicode_CompareWithASCIIString(k, names[1]) == 0 && nargs < 2) {
                max_packets = PyLong_AsLong(v);
                if (max_packets == -1 && PyErr_Occurred())
                    return NULL;
            } else {
                PyErr_Format(PyExc_TypeError, "process() got an unexpected keyword argument '%U'", k);
                return NULL;
            }
        }
    }
    if (callback == NULL || !PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_TypeError, "process() needs a callable callback");
        return NULL;
    }
    if (max_packets < 1) {
        PyErr_SetString(PyExc_ValueError, "max_packets must be at least 1");
        return NULL;
    }
    if (self->nl == NULL) {
        PyErr_SetString(PyExc_ValueError, "NfQueue is closed");
        return NULL;
    }
    if (self->in_process) {
        PyErr_SetString(PyExc_RuntimeError, "NfQueue.process() is not re-entrant");
        return NULL;
    }
    self->in_process = 1;

    while (handled < max_packets && !failed && !self->close_requested) {
        ssize_t n;
        int saved_errno;

        Py_BEGIN_ALLOW_THREADS
        n = recv(self->fd, self->rbuf, RECV_BUF_SIZE, MSG_DONTWAIT | MSG_TRUNC);
        Py_END_ALLOW_THREADS
        saved_errno = errno;
        if (n < 0) {
            if (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK)
                break;
            if (saved_errno == ENOBUFS) { /* kernel could not deliver some packets: count, go on */
                self->enobufs++;
                continue;
            }
            if (saved_errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    failed = 1;
                    break;
                }
                continue;
            }
            errno = saved_errno;
            PyErr_SetFromErrno(PyExc_OSError);
            failed = 1;
            break;
        }
        if (n == 0)
            break;
        if (n > RECV_BUF_SIZE) {
            /* Datagram larger than our buffer (cannot happen with today's attributes, but never
             * leave a packet without a verdict): its attributes start with the packet header, so
             * drop it by id as a truncated copy. */
            PacketMsg pm;
            const struct nlmsghdr *m = (const struct nlmsghdr *)self->rbuf;

            if (m->nlmsg_type == PACKET_MSG_TYPE) {
                parse_packet(m, RECV_BUF_SIZE, &pm);
                if (pm.have_hdr) {
                    self->packets++;
                    self->truncated++;
                    handled++;
                    verdict_drop(self, pm.id);
                }
            }
            continue;
        }
        int remaining = (int)n;
        for (struct nlmsghdr *m = (struct nlmsghdr *)self->rbuf; mnl_nlmsg_ok(m, remaining);
             m = mnl_nlmsg_next(m, &remaining)) {
            PacketMsg pm;
            PyObject *stack[5];
            PyObject *res;

            if (m->nlmsg_type == NLMSG_ERROR) { /* asynchronous error for an earlier verdict */
                const struct nlmsgerr *err = mnl_nlmsg_get_payload(m);
                if (m->nlmsg_len >= NLMSG_HDRLEN + sizeof(*err) && err->error != 0)
                    self->verdict_errors++;
                continue;
            }
            if (m->nlmsg_type != PACKET_MSG_TYPE)
                continue;
            parse_packet(m, m->nlmsg_len, &pm);
            if (!pm.have_hdr)
                continue;
            self->packets++;
            handled++;
            if (failed) { /* an earlier callback in this datagram raised: fail closed */
                verdict_drop(self, pm.id);
                continue;
            }
            if (!pm.have_payload || pm.payload_len == 0 || (pm.cap_len != 0 && pm.cap_len > pm.payload_len)) {
                self->truncated++;
                verdict_drop(self, pm.id);
                continue;
            }
            if (self->fast != NULL) { /* a flow the engine has decided already: no Python at all */
                PyObject *np = NULL;
                int v = self->fast_handle(self->fast, pm.hook, pm.payload, pm.payload_len, pm.indev, &np);

                if (v >= 0) {
                    self->fast_packets++;
                    if (np != NULL) {
                        ensure_room(self, (size_t)PyBytes_GET_SIZE(np));
                        append_verdict(self, pm.id, (uint32_t)v, PyBytes_AS_STRING(np), (size_t)PyBytes_GET_SIZE(np));
                        self->mangled++;
                        Py_DECREF(np);
                    } else {
                        ensure_room(self, 0);
                        append_verdict(self, pm.id, (uint32_t)v, NULL, 0);
                    }
                    if (v == NF_ACCEPT)
                        self->accepted++;
                    else
                        self->dropped++;
                    continue;
                }
            }
            stack[0] = PyBytes_FromStringAndSize((const char *)pm.payload, (Py_ssize_t)pm.payload_len);
            if (stack[0] == NULL) {
                verdict_drop(self, pm.id);
                self->callback_errors++;
                failed = 1;
                continue;
            }
            stack[1] = PyLong_FromUnsignedLong(pm.hook);
            stack[2] = PyLong_FromUnsignedLong(pm.indev);
            stack[3] = PyLong_FromUnsignedLong(pm.outdev);
            stack[4] = PyLong_FromUnsignedLong(pm.mark);
            if (stack[1] == NULL || stack[2] == NULL || stack[3] == NULL || stack[4] == NULL)
                res = NULL;
            else
                res = PyObject_Vectorcall(callback, stack, 5, NULL);
            for (int i = 0; i < 5; i++)
                Py_XDECREF(stack[i]);
            if (res == NULL || apply_result(self, pm.id, res) < 0) {
                verdict_drop(self, pm.id);
                self->callback_errors++;
                failed = 1;
            }
            Py_XDECREF(res);
        }
        if (!self->batch_verdicts)
            flush_verdicts(self);
    }
    flush_verdicts(self);
    self->in_process = 0;
    if (self->close_requested)
        close_socket(self);
    if (failed)
        return NULL;
    return PyLong_FromLong(handled);
}

/* ---------- small methods ---------- */

static PyObject *
NfQueue_fileno(NfQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->nl == NULL) {
        PyErr_SetString(PyExc_ValueError, "NfQueue is closed");
        return NULL;
    }
    return PyLong_FromLong(self->fd);
}

static PyObject *
NfQueue_close(NfQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->in_process) /* called from the callback: finish the current process() first */
        self->close_requested = 1;
    else
        close_socket(self);
    Py_RETURN_NONE;
}

static PyObject *
NfQueue_stats(NfQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsK}", "packets", self->packets, "accepted", self->accepted, "dropped",
                         self->dropped, "mangled", self->mangled, "truncated", self->truncated, "enobufs",
                         self->enobufs, "callback_errors", self->callback_errors, "verdict_errors",
                         self->verdict_errors, "fast_path", self->fast_packets);
}

static PyObject *
NfQueue_get_closed(NfQueueObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->nl == NULL);
}

static PyObject *
NfQueue_get_queue_num(NfQueueObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->queue_num);
}

static PyMethodDef NfQueue_methods[] = {
    {"process", (PyCFunction)(void (*)(void))NfQueue_process, METH_FASTCALL | METH_KEYWORDS,
     "process(callback, max_packets=64) -> int: handle up to max_packets already-queued packets "
     "without blocking."},
    {"fileno", (PyCFunction)NfQueue_fileno, METH_NOARGS, "The netlink socket's descriptor (for poll)."},
    {"close", (PyCFunction)NfQueue_close, METH_NOARGS, "Unbind the queue and close the socket (idempotent)."},
    {"stats", (PyCFunction)NfQueue_stats, METH_NOARGS, "Binding-side counters."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
NfQueue_get_fastpath(NfQueueObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->fast != NULL ? self->fast : Py_None);
}

static int
NfQueue_set_fastpath(NfQueueObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    FastPathApi *api;

    if (self->in_process) {
        PyErr_SetString(PyExc_RuntimeError, "cannot change the fast path during process()");
        return -1;
    }
    if (value == NULL || value == Py_None) {
        Py_CLEAR(self->fast);
        return 0;
    }
    api = PyCapsule_Import("nfq_ipsec._espcore._FASTPATH_API", 0);
    if (api == NULL)
        return -1;
    if (!PyObject_TypeCheck(value, api->type)) {
        PyErr_Format(PyExc_TypeError, "fastpath must be a nfq_ipsec._espcore.FastPath or None, not %.50s",
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    self->fast_handle = api->handle;
    Py_XSETREF(self->fast, Py_NewRef(value));
    return 0;
}

static PyGetSetDef NfQueue_getset[] = {
    {"fastpath", (getter)NfQueue_get_fastpath, (setter)NfQueue_set_fastpath,
     "An _espcore.FastPath handling decided flows before the callback, or None.", NULL},
    {"closed", (getter)NfQueue_get_closed, NULL, "True once close() ran.", NULL},
    {"queue_num", (getter)NfQueue_get_queue_num, NULL, "The NFQUEUE number.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NfQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nfq_ipsec._nfqueue.NfQueue",
    .tp_basicsize = sizeof(NfQueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "NfQueue(queue_num, *, maxlen=8192, fail_open=False, rcvbuf=8<<20, batch_verdicts=False): "
              "whole-packet NFQUEUE binding.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NfQueue_init,
    .tp_dealloc = (destructor)NfQueue_dealloc,
    .tp_methods = NfQueue_methods,
    .tp_getset = NfQueue_getset,
};

static struct PyModuleDef nfqueue_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nfq_ipsec._nfqueue",
    .m_doc = "Whole-packet NFQUEUE binding over libmnl (see nfq_ipsec.nfqueue).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__nfqueue(void)
{
    PyObject *m;

    if (PyType_Ready(&NfQueueType) < 0)
        return NULL;
    m = PyModule_Create(&nfqueue_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&NfQueueType);
    if (PyModule_AddObject(m, "NfQueue", (PyObject *)&NfQueueType) < 0 ||
        PyModule_AddIntConstant(m, "NF_DROP", NF_DROP) < 0 || PyModule_AddIntConstant(m, "NF_ACCEPT", NF_ACCEPT) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PAYLOAD", NFQ_MAX_PAYLOAD) < 0) {
        Py_DECREF(&NfQueueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
