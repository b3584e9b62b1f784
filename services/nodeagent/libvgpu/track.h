/*
 * track.h - what libvgpu charged for each live allocation.
 *
 * Frees must credit exactly what was charged, and a pointer libvgpu never
 * charged must reach the driver untouched (HAMi-core #257), so every charged
 * pointer or handle is remembered here.  The table is split into stripes with
 * their own locks so concurrent threads rarely meet: no global lock on the
 * allocation path (HAMi-core PR #166).
 */
#ifndef VSLICE_TRACK_H
#define VSLICE_TRACK_H

#include <stdint.h>

struct vgpu_table;

VGPU_HIDDEN struct vgpu_table *vgpu_table_new(void);
/* Remembers key (non-zero) with its charge's owner (VGPU_OWNER); returns 0
 * if memory for the table ran out. */
VGPU_HIDDEN int vgpu_table_put(struct vgpu_table *t, uint64_t key, uint64_t bytes, int dev,
                               uint64_t owner);
/* Forgets key; returns 1 and what was recorded if it was there (owner may be NULL). */
VGPU_HIDDEN int vgpu_table_take(struct vgpu_table *t, uint64_t key, uint64_t *bytes, int *dev,
                                uint64_t *owner);
VGPU_HIDDEN int vgpu_table_get(struct vgpu_table *t, uint64_t key, uint64_t *bytes, int *dev,
                               uint64_t *owner);

#endif
