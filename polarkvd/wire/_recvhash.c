/* The peer data path's receive, compiled: one payload recv()ed straight into the caller's buffer a
 * chunk at a time, each chunk fed to a streaming xxh3_64 while it is still in cache, then its 8-byte
 * checksum trailer; the GIL released throughout (polarkvd/transport/peer_wire.py, `recv_payload`,
 * is the contract and holds the pure-Python fallback).
 *
 * xxh3 comes from the `xxhash` Python package, which the daemon already imports: `bind` is given the
 * path of its loaded extension module and looks up the streaming functions there (dlsym), so the
 * checksum is the very function `xxhash.xxh3_64_intdigest` computes and the wire's meaning does not
 * change. Nothing of xxhash is vendored; where the symbols are not found, `bind` raises and the
 * transport receives and hashes in Python.
 *
 * Only the CPython C API and libc: built by setup.py as an optional extension.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

typedef void XXH3_state;
typedef XXH3_state *(*create_fn)(void);
typedef int (*free_fn)(XXH3_state *);
typedef int (*reset_fn)(XXH3_state *);
typedef int (*update_fn)(XXH3_state *, const void *, size_t);
typedef uint64_t (*digest_fn)(const XXH3_state *);

static struct {
    create_fn create;
    free_fn free;
    reset_fn reset;
    update_fn update;
    digest_fn digest;
} xxh;

/* recv_hash's outcomes (peer_wire.py turns them into its exceptions) */
#define ST_OK 0
#define ST_CLOSED 1  /* EOF before the payload and its trailer were in */
#define ST_TIMEOUT 2 /* SO_RCVTIMEO expired, or the deadline passed between chunks */
#define TRAILER_BYTES 8

static PyObject *rh_bind(PyObject *self, PyObject *arg) {
    const char *path = PyUnicode_AsUTF8(arg);
    if (path == NULL)
        return NULL;
    /* already loaded by `import xxhash`: RTLD_NOLOAD takes that copy, never a second one */
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        PyErr_Format(PyExc_ImportError, "xxhash's module is not loaded: %s", dlerror());
        return NULL;
    }
    xxh.create = (create_fn)dlsym(h, "XXH3_createState");
    xxh.free = (free_fn)dlsym(h, "XXH3_freeState");
    xxh.reset = (reset_fn)dlsym(h, "XXH3_64bits_reset");
    /* the CPU-dispatched update (AVX2/AVX-512 where the CPU has them) when the build has one: the
     * same result as the plain one, faster */
    xxh.update = (update_fn)dlsym(h, "XXH3_64bits_update_dispatch");
    if (xxh.update == NULL)
        xxh.update = (update_fn)dlsym(h, "XXH3_64bits_update");
    xxh.digest = (digest_fn)dlsym(h, "XXH3_64bits_digest");
    if (!xxh.create || !xxh.free || !xxh.reset || !xxh.update || !xxh.digest) {
        memset(&xxh, 0, sizeof xxh);
        PyErr_SetString(PyExc_ImportError, "xxhash's module does not export the XXH3 streaming API");
        return NULL;
    }
    Py_RETURN_NONE;
}

static double now_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what Python's time.monotonic() reads on Linux */
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* recv exactly n bytes into p (MSG_WAITALL: one wake-up per call, not per segment). Returns ST_*,
 * or -1 with errno set; EINTR comes back to the caller, which checks signals with the GIL. */
static int recv_exact(int fd, unsigned char *p, size_t n, size_t *got) {
    while (*got < n) {
        ssize_t k = recv(fd, p + *got, n - *got, MSG_WAITALL);
        if (k > 0) {
            *got += (size_t)k;
            continue;
        }
        if (k == 0)
            return ST_CLOSED;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return ST_TIMEOUT;
        return -1;
    }
    return ST_OK;
}

static PyObject *rh_hash(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (xxh.create == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    XXH3_state *st = xxh.create();
    if (st == NULL) {
        PyBuffer_Release(&b);
        return PyErr_NoMemory();
    }
    xxh.reset(st);
    xxh.update(st, b.buf, (size_t)b.len);
    uint64_t h = xxh.digest(st);
    xxh.free(st);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

/* recv_hash(fd, dst, trailer, chunk, deadline) -> (status, received, xxh3 of dst, trailer's value)
 *
 * Fills the writable buffer `dst` from socket `fd` `chunk` bytes at a time, hashing each chunk right
 * after it lands, then the 8-byte little-endian trailer into `trailer`. `deadline`: a time.monotonic()
 * instant checked between chunks (0: none); each recv is bounded by the socket's SO_RCVTIMEO. The
 * hash is of the whole buffer only when status is ST_OK; `received` counts the bytes of dst and
 * trailer that arrived. */
static PyObject *rh_recv_hash(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer dst, tr;
    Py_ssize_t chunk;
    double deadline;
    if (xxh.create == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "iw*w*nd", &fd, &dst, &tr, &chunk, &deadline))
        return NULL;
    PyObject *out = NULL;
    XXH3_state *st = NULL;
    if (tr.len != TRAILER_BYTES || chunk <= 0) {
        PyErr_SetString(PyExc_ValueError, "trailer must be 8 bytes and chunk positive");
        goto done;
    }
    st = xxh.create();
    if (st == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    xxh.reset(st);
    unsigned char *p = dst.buf;
    size_t n = (size_t)dst.len, got = 0, hashed = 0, tgot = 0;
    int status = ST_OK, err = 0;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS;
        while (got < n) {
            size_t end = got + (size_t)chunk < n ? got + (size_t)chunk : n;
            status = recv_exact(fd, p, end, &got);
            if (status != ST_OK)
                break;
            xxh.update(st, p + hashed, end - hashed);
            hashed = end;
            if (got < n && deadline > 0 && now_monotonic() >= deadline) {
                status = ST_TIMEOUT;
                break;
            }
        }
        if (status == ST_OK)
            status = recv_exact(fd, tr.buf, TRAILER_BYTES, &tgot);
        err = errno;
        Py_END_ALLOW_THREADS;
        if (status == -1 && err == EINTR) { /* a signal: its handler may raise (Ctrl-C) */
            if (PyErr_CheckSignals() < 0)
                goto done;
            if (hashed < got) { /* part of a chunk landed: hash it, then go on from there */
                xxh.update(st, p + hashed, got - hashed);
                hashed = got;
            }
            status = ST_OK;
            continue;
        }
        break;
    }
    if (status == -1) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    uint64_t want = 0;
    memcpy(&want, tr.buf, TRAILER_BYTES); /* little-endian machines, as the wire (struct "<Q") */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    want = __builtin_bswap64(want);
#endif
    out = Py_BuildValue("inKK", status, (Py_ssize_t)(got + tgot),
                        (unsigned long long)(status == ST_OK ? xxh.digest(st) : 0),
                        (unsigned long long)want);
done:
    if (st != NULL)
        xxh.free(st);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&tr);
    return out;
}

static PyMethodDef methods[] = {
    {"bind", rh_bind, METH_O, "bind(path): take xxh3's streaming functions from xxhash's loaded module"},
    {"hash", rh_hash, METH_O, "hash(buf) -> xxh3_64 of buf, through the bound functions"},
    {"recv_hash", rh_recv_hash, METH_VARARGS,
     "recv_hash(fd, dst, trailer, chunk, deadline) -> (status, received, sum, trailer value)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "polarkvd.wire._recvhash", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__recvhash(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "OK", ST_OK) < 0 || PyModule_AddIntConstant(m, "CLOSED", ST_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "TIMEOUT", ST_TIMEOUT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
