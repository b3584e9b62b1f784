/* track.c - striped open-addressing hash table of charged allocations. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "vgpu.h"
#include "track.h"

#define STRIPES 64
#define INITIAL_CAPACITY 64

struct entry {
    uint64_t key; /* 0 = empty */
    uint64_t bytes;
    uint64_t owner;
    int64_t dev;
};

struct stripe {
    pthread_mutex_t lock;
    struct entry *slots;
    size_t capacity; /* power of two */
    size_t count;
} __attribute__((aligned(64)));

struct vgpu_table {
    struct stripe stripes[STRIPES];
};

static uint64_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
}

struct vgpu_table *vgpu_table_new(void) {
    struct vgpu_table *t = aligned_alloc(64, sizeof *t);
    if (t == NULL) abort();
    for (int i = 0; i < STRIPES; i++) {
        pthread_mutex_init(&t->stripes[i].lock, NULL);
        t->stripes[i].slots = NULL;
        t->stripes[i].capacity = 0;
        t->stripes[i].count = 0;
    }
    return t;
}

static struct stripe *stripe_of(struct vgpu_table *t, uint64_t h) { return &t->stripes[h % STRIPES]; }

static void insert(struct entry *slots, size_t cap, struct entry e, uint64_t h) {
    size_t i = (h >> 6) & (cap - 1);
    while (slots[i].key != 0) i = (i + 1) & (cap - 1);
    slots[i] = e;
}

static int grow(struct stripe *s) {
    size_t cap = s->capacity == 0 ? INITIAL_CAPACITY : s->capacity * 2;
    struct entry *slots = calloc(cap, sizeof *slots);
    if (slots == NULL) return 0;
    for (size_t i = 0; i < s->capacity; i++)
        if (s->slots[i].key != 0) insert(slots, cap, s->slots[i], mix(s->slots[i].key));
    free(s->slots);
    s->slots = slots;
    s->capacity = cap;
    return 1;
}

int vgpu_table_put(struct vgpu_table *t, uint64_t key, uint64_t bytes, int dev, uint64_t owner) {
    uint64_t h = mix(key);
    struct stripe *s = stripe_of(t, h);
    pthread_mutex_lock(&s->lock);
    int ok = 1;
    if ((s->count + 1) * 4 > s->capacity * 3) ok = grow(s);
    if (ok) {
        insert(s->slots, s->capacity, (struct entry){.key = key, .bytes = bytes, .owner = owner, .dev = dev}, h);
        s->count++;
    }
    pthread_mutex_unlock(&s->lock);
    return ok;
}

static long find(struct stripe *s, uint64_t key, uint64_t h) {
    if (s->capacity == 0) return -1;
    size_t i = (h >> 6) & (s->capacity - 1);
    while (s->slots[i].key != 0) {
        if (s->slots[i].key == key) return (long)i;
        i = (i + 1) & (s->capacity - 1);
    }
    return -1;
}

int vgpu_table_get(struct vgpu_table *t, uint64_t key, uint64_t *bytes, int *dev,
                   uint64_t *owner) {
    uint64_t h = mix(key);
    struct stripe *s = stripe_of(t, h);
    pthread_mutex_lock(&s->lock);
    long i = find(s, key, h);
    if (i >= 0) {
        *bytes = s->slots[i].bytes;
        *dev = (int)s->slots[i].dev;
        if (owner != NULL) *owner = s->slots[i].owner;
    }
    pthread_mutex_unlock(&s->lock);
    return i >= 0;
}

int vgpu_table_take(struct vgpu_table *t, uint64_t key, uint64_t *bytes, int *dev,
                    uint64_t *owner) {
    uint64_t h = mix(key);
    struct stripe *s = stripe_of(t, h);
    pthread_mutex_lock(&s->lock);
    long found = find(s, key, h);
    if (found >= 0) {
        size_t mask = s->capacity - 1;
        size_t i = (size_t)found;
        *bytes = s->slots[i].bytes;
        *dev = (int)s->slots[i].dev;
        if (owner != NULL) *owner = s->slots[i].owner;
        /* backward-shift deletion keeps probe chains whole without tombstones */
        size_t j = i;
        for (;;) {
            j = (j + 1) & mask;
            if (s->slots[j].key == 0) break;
            size_t home = (mix(s->slots[j].key) >> 6) & mask;
            int between = i <= j ? (i < home && home <= j) : (i < home || home <= j);
            if (between) continue;
            s->slots[i] = s->slots[j];
            i = j;
        }
        s->slots[i].key = 0;
        s->count--;
    }
    pthread_mutex_unlock(&s->lock);
    return found >= 0;
}
