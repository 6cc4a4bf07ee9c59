/* The output cache: a NumPy memory handler (NEP 49) for cynorm's large outputs.
 *
 * A NumPy array of 32 MiB and more gets fresh memory from the kernel (glibc maps it and
 * unmaps it when freed), and the first write to fresh memory costs a page fault per page
 * and the kernel's zeroing of it: on the reference machine filling a fresh 64 MiB array
 * takes 3.5x as long as filling a reused one, more than a normalisation of it. cynorm
 * allocates its outputs of CN_POOL_MIN bytes and more through this handler: a freed block
 * is kept (up to cn_pool_limit bytes in all) and handed to the next output that fits it,
 * so a loop of calls on large arrays reuses memory already mapped.
 *
 * Each block is one anonymous mapping, its length a multiple of 2 MiB (transparent huge
 * pages where the system allows them); a 64-byte head in front of the data records the
 * length and the size of the output it last held, so free needs nothing from NumPy but
 * the pointer. The limit counts the idle blocks' output sizes (an output of exactly the
 * limit is kept), not their rounded mappings: at most 2 MiB more per block. Idle blocks are kept in
 * first-freed order and the oldest is unmapped first when the limit is reached. One
 * mutex guards the list (NumPy may free an array on any thread); a forked child starts
 * with the lock free and the parent's idle blocks (its own copies). */
#ifndef CN_POOL_H
#define CN_POOL_H

#include <Python.h>
#include <numpy/arrayobject.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define CN_POOL_HEAD 64
#define CN_POOL_GRAIN ((size_t)2 << 20)
#define CN_POOL_SLOTS 32

typedef struct {
    size_t len;      /* the whole mapping, head included */
    size_t size;     /* bytes of the output it holds or last held: what the limit counts */
} cn_pool_head;

static pthread_mutex_t cn_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static char* cn_pool_idle[CN_POOL_SLOTS];   /* idle blocks, oldest first */
static int cn_pool_nidle = 0;
static size_t cn_pool_cached = 0;           /* output bytes of the idle blocks */
static size_t cn_pool_limit = 0;            /* most bytes kept idle */
static size_t cn_pool_hits = 0, cn_pool_maps = 0;

static void cn_pool_atfork_child(void) {
    pthread_mutex_init(&cn_pool_lock, NULL);
}

static size_t cn_pool_len_of(char* base) { return ((cn_pool_head*)base)->len; }
static size_t cn_pool_size_of(char* base) { return ((cn_pool_head*)base)->size; }

/* a mapping for size bytes of data, or NULL (size too large, or no memory) */
static char* cn_pool_map(size_t size) {
    if (size > SIZE_MAX - CN_POOL_HEAD - CN_POOL_GRAIN) return NULL;
    size_t len = (size + CN_POOL_HEAD + CN_POOL_GRAIN - 1) / CN_POOL_GRAIN * CN_POOL_GRAIN;
    void* p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, len, MADV_HUGEPAGE);
#endif
    ((cn_pool_head*)p)->len = len;
    ((cn_pool_head*)p)->size = size;
    return (char*)p;
}

/* drop idle block i from the list (the caller holds the lock); returns its base */
static char* cn_pool_take(int i) {
    char* base = cn_pool_idle[i];
    cn_pool_cached -= cn_pool_size_of(base);
    memmove(cn_pool_idle + i, cn_pool_idle + i + 1,
            (size_t)(cn_pool_nidle - i - 1) * sizeof(char*));
    cn_pool_nidle--;
    return base;
}

/* an idle block whose data fits size and wastes at most an eighth more, the smallest
 * such; NULL for none. *hit says which. */
static char* cn_pool_get(size_t size, int* hit) {
    char* base = NULL;
    int best = -1;
    size_t need = size + CN_POOL_HEAD, best_len = 0;
    pthread_mutex_lock(&cn_pool_lock);
    for (int i = 0; i < cn_pool_nidle; i++) {
        size_t len = cn_pool_len_of(cn_pool_idle[i]);
        if (len >= need && len - need <= need / 8 + CN_POOL_GRAIN &&
            (best < 0 || len < best_len)) {
            best = i;
            best_len = len;
        }
    }
    if (best >= 0) {
        base = cn_pool_take(best);
        ((cn_pool_head*)base)->size = size;
        cn_pool_hits++;
    }
    pthread_mutex_unlock(&cn_pool_lock);
    *hit = base != NULL;
    if (base == NULL) {
        base = cn_pool_map(size);
        if (base != NULL) {
            pthread_mutex_lock(&cn_pool_lock);
            cn_pool_maps++;
            pthread_mutex_unlock(&cn_pool_lock);
        }
    }
    return base;
}

static void* cn_pool_malloc(void* ctx, size_t size) {
    int hit;
    char* base = cn_pool_get(size, &hit);
    (void)ctx;
    return base == NULL ? NULL : base + CN_POOL_HEAD;
}

static void* cn_pool_calloc(void* ctx, size_t nelem, size_t elsize) {
    int hit;
    char* base;
    (void)ctx;
    if (elsize != 0 && nelem > SIZE_MAX / elsize) return NULL;
    base = cn_pool_get(nelem * elsize, &hit);
    if (base == NULL) return NULL;
    if (hit) memset(base + CN_POOL_HEAD, 0, nelem * elsize);  /* fresh maps are zeroed */
    return base + CN_POOL_HEAD;
}

static void cn_pool_free(void* ctx, void* p, size_t size) {
    char* base;
    size_t held;
    char* drop[CN_POOL_SLOTS + 1];
    int ndrop = 0;
    (void)ctx;
    (void)size;
    if (p == NULL) return;
    base = (char*)p - CN_POOL_HEAD;
    held = cn_pool_size_of(base);
    pthread_mutex_lock(&cn_pool_lock);
    if (held <= cn_pool_limit) {
        while (cn_pool_nidle > 0 &&
               (cn_pool_cached + held > cn_pool_limit || cn_pool_nidle == CN_POOL_SLOTS))
            drop[ndrop++] = cn_pool_take(0);
        cn_pool_idle[cn_pool_nidle++] = base;
        cn_pool_cached += held;
    } else {
        drop[ndrop++] = base;
    }
    pthread_mutex_unlock(&cn_pool_lock);
    for (int i = 0; i < ndrop; i++) munmap(drop[i], cn_pool_len_of(drop[i]));
}

static void* cn_pool_realloc(void* ctx, void* p, size_t new_size) {
    void* q;
    cn_pool_head* head;
    if (p == NULL) return cn_pool_malloc(ctx, new_size);
    head = (cn_pool_head*)((char*)p - CN_POOL_HEAD);
    if (new_size <= head->len - CN_POOL_HEAD) {   /* fits in place */
        head->size = new_size;
        return p;
    }
    q = cn_pool_malloc(ctx, new_size);
    if (q == NULL) return NULL;
    memcpy(q, p, head->size);   /* the old contents; new_size is larger */
    cn_pool_free(ctx, p, head->size);
    return q;
}

static PyDataMem_Handler cn_pool_handler = {
    "cynorm_output_cache",
    1,
    {NULL, cn_pool_malloc, cn_pool_calloc, cn_pool_realloc, cn_pool_free},
};

/* the handler as NumPy takes it (a "mem_handler" capsule); registers the fork hook */
static PyObject* cn_pool_capsule(void) {
    pthread_atfork(NULL, NULL, cn_pool_atfork_child);
    return PyCapsule_New(&cn_pool_handler, "mem_handler", NULL);
}

/* the most bytes kept idle; blocks beyond it are unmapped now */
static void cn_pool_set_limit(size_t limit) {
    char* drop[CN_POOL_SLOTS];
    int ndrop = 0;
    pthread_mutex_lock(&cn_pool_lock);
    cn_pool_limit = limit;
    while (cn_pool_nidle > 0 && cn_pool_cached > cn_pool_limit)
        drop[ndrop++] = cn_pool_take(0);
    pthread_mutex_unlock(&cn_pool_lock);
    for (int i = 0; i < ndrop; i++) munmap(drop[i], cn_pool_len_of(drop[i]));
}

static void cn_pool_info(size_t* limit, size_t* cached, size_t* blocks, size_t* hits,
                         size_t* maps) {
    pthread_mutex_lock(&cn_pool_lock);
    *limit = cn_pool_limit;
    *cached = cn_pool_cached;
    *blocks = (size_t)cn_pool_nidle;
    *hits = cn_pool_hits;
    *maps = cn_pool_maps;
    pthread_mutex_unlock(&cn_pool_lock);
}

#endif
