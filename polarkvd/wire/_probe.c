/* The shared lookup table's probe, compiled: one call per lookup does what TableReader's Python
 * probe does (polarkvd/wire/lookup_table.py, whose docstring is the contract): each key from its
 * home entry with linear probing past it, the 24-byte flags + key + namespace comparison, tier
 * bytes, the session slot's tallies and its touch ring, and whether a miss is final.
 *
 * Memory ordering, as the Python probe's: an entry's flags word is loaded first (acquire, so the key
 * and namespace loads come after it, as the Python copy's ascending loads do), then its key and
 * namespace; a hit needs all of them to match. Every word of the header and the slot is loaded and
 * stored whole (aligned atomic loads and stores, relaxed: single moves on x86-64 and AArch64); the
 * ring's items are stored before the head that publishes them (release). Nothing is ever zeroed
 * before it is written. Little-endian machines only, as the layout.
 *
 * Only the CPython C API: built by setup.py as an optional extension; without it the Python probe
 * answers (lookup_table.py chooses).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "polarkvd's shared-memory layouts are little-endian"
#endif

/* the layout: lookup_table.py's constants (checked against them at construction) */
#define HEADER_BYTES 4096
#define ENTRY_BYTES 32
#define SLOT_BYTES 1024
#define KEY_BYTES 16
#define RING_AT 64
#define RING_ENTRIES ((SLOT_BYTES - RING_AT) / 4)
#define HEARTBEAT_AT 16
#define STATE_AT 24
#define OVERFLOW_AT 28
#define TIER_AT 24 /* in an entry */
#define TALLY_AT 8 /* in a slot: lookups, pages, hits */
#define TOUCH_HEAD_AT 32
#define VRAM_HITS_AT 40
#define DISK_HITS_AT 48
#define FINAL_AT 56
#define FLAGS_EMPTY 0u
#define FLAGS_LIVE 1u
#define TIER_VRAM 1
#define TIER_DRAM 2
#define TIER_DISK 4
#define STACK_KEYS 256 /* keys whose tier bytes fit on the stack; more: a heap buffer */

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* held while open: the mapping cannot close under the probe */
    int open;
    unsigned char *base;
    uint64_t mask;
    uint32_t ns;
    Py_ssize_t slot_at;
    Py_ssize_t entries_end;
    int final_miss;
} Prober;

static inline uint32_t load32(const unsigned char *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}
static inline uint64_t load64(const unsigned char *p) {
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
}
static inline void store64(unsigned char *p, uint64_t v) {
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED);
}

static int Prober_init(Prober *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buf", "capacity", "ns", "slot_at", "final_miss", NULL};
    PyObject *buf;
    unsigned long long capacity;
    unsigned long ns;
    Py_ssize_t slot_at;
    int final_miss;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKknp", kwlist, &buf, &capacity, &ns, &slot_at,
                                     &final_miss))
        return -1;
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "Prober already initialised");
        return -1;
    }
    if (capacity == 0 || (capacity & (capacity - 1))) {
        PyErr_SetString(PyExc_ValueError, "table capacity must be a power of two");
        return -1;
    }
    if (ns > 0xffffffffUL) {
        PyErr_SetString(PyExc_ValueError, "namespace id must fit 32 bits");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    Py_ssize_t entries_end = HEADER_BYTES + (Py_ssize_t)capacity * ENTRY_BYTES;
    if (slot_at < entries_end || (slot_at - entries_end) % SLOT_BYTES ||
        slot_at + SLOT_BYTES > self->view.len || ((uintptr_t)self->view.buf & 7)) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "not a session slot of a lookup table in this buffer");
        return -1;
    }
    self->open = 1;
    self->base = (unsigned char *)self->view.buf;
    self->mask = capacity - 1;
    self->ns = (uint32_t)ns;
    self->slot_at = slot_at;
    self->entries_end = entries_end;
    self->final_miss = final_miss;
    return 0;
}

/* usable(stale_ns): the table is open and its heartbeat (CLOCK_MONOTONIC, as time.monotonic_ns)
 * is younger than stale_ns */
static PyObject *Prober_usable(Prober *self, PyObject *arg) {
    long long stale = PyLong_AsLongLong(arg);
    if (stale == -1 && PyErr_Occurred())
        return NULL;
    if (!self->open || load32(self->base + STATE_AT) != 1)
        Py_RETURN_FALSE;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long now = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    long long beat = (long long)load64(self->base + HEARTBEAT_AT);
    return PyBool_FromLong(now - beat < stale);
}

static PyObject *Prober_close(Prober *self, PyObject *Py_UNUSED(ignored)) {
    if (self->open) {
        self->open = 0;
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static void Prober_dealloc(Prober *self) {
    Prober_close(self, NULL);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The entry offset of `key` (16 bytes) in the table, or -1 when an empty entry ends its path. */
static inline Py_ssize_t find(const Prober *self, const unsigned char *key) {
    const unsigned char *b = self->base;
    uint64_t home;
    memcpy(&home, key, 8);
    Py_ssize_t at = HEADER_BYTES + (Py_ssize_t)((home & self->mask) * ENTRY_BYTES);
    for (uint64_t step = 0; step <= self->mask; step++) {
        /* flags first, then key and namespace: one copy of the entry, as the Python probe's */
        uint32_t flags = __atomic_load_n((const uint32_t *)(b + at), __ATOMIC_ACQUIRE);
        if (flags == FLAGS_EMPTY)
            return -1;
        if (flags == FLAGS_LIVE) {
            unsigned char rest[KEY_BYTES + 4];
            memcpy(rest, b + at + 4, sizeof rest);
            uint32_t ns;
            memcpy(&ns, rest + KEY_BYTES, 4);
            if (ns == self->ns && memcmp(rest, key, KEY_BYTES) == 0)
                return at;
        }
        at += ENTRY_BYTES;
        if (at >= self->entries_end)
            at = HEADER_BYTES;
    }
    return -1;
}

/* A key's bytes: bytes objects directly, other buffers through the buffer protocol (TypeError for
 * what is neither). `held` is released by the caller when `*got` says so. */
static int key_bytes(PyObject *key, const unsigned char **out, Py_ssize_t *len, Py_buffer *held, int *got) {
    *got = 0;
    if (PyBytes_CheckExact(key)) {
        *out = (const unsigned char *)PyBytes_AS_STRING(key);
        *len = PyBytes_GET_SIZE(key);
        return 0;
    }
    if (!PyObject_CheckBuffer(key)) {
        PyErr_Format(PyExc_TypeError, "lookup keys must be bytes, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(key, held, PyBUF_SIMPLE) < 0)
        return -1;
    *got = 1;
    *out = (const unsigned char *)held->buf;
    *len = held->len;
    return 0;
}

static PyObject *Prober_probe(Prober *self, PyObject *keys) {
    if (!self->open) {
        PyErr_SetString(PyExc_ValueError, "probe after close");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(keys, "lookup keys must be a sequence of bytes");
    if (seq == NULL)
        return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < m; i++) {
        if (!PyBytes_CheckExact(items[i]) && PyList_CheckExact(seq)) {
            /* a key that is another buffer: its buffer code might change the list under us, so
             * probe a tuple of the keys (holding them) instead */
            PyObject *frozen = PyList_AsTuple(seq);
            Py_DECREF(seq);
            if (frozen == NULL)
                return NULL;
            seq = frozen;
            items = PySequence_Fast_ITEMS(seq);
            break;
        }
    }
    /* every key checked before anything is probed or counted: a bad one is the daemon's to report */
    for (Py_ssize_t i = 0; i < m; i++) {
        PyObject *k = items[i];
        Py_ssize_t len;
        if (PyBytes_CheckExact(k)) {
            len = PyBytes_GET_SIZE(k);
        } else {
            const unsigned char *p;
            Py_buffer held;
            int got;
            if (key_bytes(k, &p, &len, &held, &got) < 0) {
                Py_DECREF(seq);
                return NULL;
            }
            if (got)
                PyBuffer_Release(&held);
        }
        if (len != KEY_BYTES) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "lookup keys must be %d bytes, key %zd has %zd",
                                KEY_BYTES, i, len);
        }
    }

    unsigned char stack_tiers[STACK_KEYS];
    unsigned char *tiers = stack_tiers;
    if (m > STACK_KEYS && (tiers = PyMem_Malloc((size_t)m)) == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    uint32_t ring_items[RING_ENTRIES]; /* the first hits (the root's end): all the ring keeps */
    unsigned char *b = self->base;
    Py_ssize_t n = 0;
    int not_dram = 0;
    for (; n < m; n++) {
        const unsigned char *key;
        Py_ssize_t len;
        Py_buffer held;
        int got;
        if (key_bytes(items[n], &key, &len, &held, &got) < 0)
            break; /* checked above; a buffer that changed since (a bytearray resized): an error */
        Py_ssize_t at = find(self, key);
        if (got)
            PyBuffer_Release(&held);
        if (at < 0)
            break;
        unsigned char tier = __atomic_load_n(b + at + TIER_AT, __ATOMIC_RELAXED);
        tiers[n] = tier;
        not_dram |= tier != TIER_DRAM;
        if (n < RING_ENTRIES)
            ring_items[n] = (uint32_t)at;
    }
    if (PyErr_Occurred()) {
        if (tiers != stack_tiers)
            PyMem_Free(tiers);
        Py_DECREF(seq);
        return NULL;
    }

    unsigned char *slot = b + self->slot_at;
    uint64_t vram = 0, disk = 0;
    if (not_dram) {
        for (Py_ssize_t i = 0; i < n; i++) {
            vram += tiers[i] == TIER_VRAM;
            disk += tiers[i] == TIER_DISK;
        }
        if (vram)
            store64(slot + VRAM_HITS_AT, load64(slot + VRAM_HITS_AT) + vram);
        if (disk)
            store64(slot + DISK_HITS_AT, load64(slot + DISK_HITS_AT) + disk);
    }
    /* a miss is final only if the table was open all along (a rebuild empties it after closing) */
    int final = n == m || ((self->final_miss || load32(slot + FINAL_AT) == 1) &&
                           load32(b + OVERFLOW_AT) == 0 && load32(b + STATE_AT) == 1);
    /* a lookup that goes on over the socket is counted by the daemon; here only its pages so far */
    unsigned char *tally = slot + TALLY_AT;
    store64(tally, load64(tally) + (uint64_t)final);
    store64(tally + 8, load64(tally + 8) + (uint64_t)(final ? m : n));
    store64(tally + 16, load64(tally + 16) + (uint64_t)n);
    if (n) {
        /* entry offsets of the hits, leaf first (the root ends up the most recently used); more
         * than a ring: the newest ones, those nearest the root */
        uint64_t head = load64(slot + TOUCH_HEAD_AT);
        Py_ssize_t keep = n < RING_ENTRIES ? n : RING_ENTRIES;
        uint64_t pos = (head + (uint64_t)(n - keep)) % RING_ENTRIES;
        uint32_t *ring = (uint32_t *)(slot + RING_AT);
        for (Py_ssize_t j = 0; j < keep; j++) {
            __atomic_store_n(ring + pos, ring_items[keep - 1 - j], __ATOMIC_RELAXED);
            if (++pos == RING_ENTRIES)
                pos = 0;
        }
        __atomic_store_n((uint64_t *)(slot + TOUCH_HEAD_AT), head + (uint64_t)n, __ATOMIC_RELEASE);
    }

    PyObject *out = NULL;
    PyObject *where = Py_None;
    Py_INCREF(where);
    if (not_dram) {
        Py_DECREF(where);
        where = PyBytes_FromStringAndSize((const char *)tiers, n);
    }
    if (where != NULL)
        out = Py_BuildValue("(nNN)", n, PyBool_FromLong(final), where);
    if (tiers != stack_tiers)
        PyMem_Free(tiers);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef Prober_methods[] = {
    {"probe", (PyCFunction)Prober_probe, METH_O,
     "probe(keys) -> (hits, final, tiers or None): the longest prefix of `keys` the table holds for "
     "this session's namespace, whether a miss after it is final, and the hits' tier bytes (None: "
     "all in DRAM); the session's tallies and touch ring are updated. Keys must be 16-byte bytes "
     "(TypeError, ValueError; nothing is counted then)."},
    {"usable", (PyCFunction)Prober_usable, METH_O,
     "usable(stale_ns) -> whether the table is open and its heartbeat younger than stale_ns."},
    {"close", (PyCFunction)Prober_close, METH_NOARGS, "Release the buffer; probing after it is an error."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProberType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "polarkvd.wire._probe.Prober",
    .tp_basicsize = sizeof(Prober),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Prober(buf, capacity, ns, slot_at, final_miss): one session's probe of the shared "
              "lookup table in the writable buffer `buf` (lookup_table.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Prober_init,
    .tp_dealloc = (destructor)Prober_dealloc,
    .tp_methods = Prober_methods,
};

static struct PyModuleDef probe_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "polarkvd.wire._probe",
    .m_doc = "The shared lookup table's probe, compiled (lookup_table.py chooses it when present).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__probe(void) {
    if (PyType_Ready(&ProberType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&probe_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ProberType);
    if (PyModule_AddObject(m, "Prober", (PyObject *)&ProberType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "ENTRY_BYTES", ENTRY_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_BYTES", SLOT_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "RING_AT", RING_AT) < 0) {
        Py_DECREF(&ProberType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
