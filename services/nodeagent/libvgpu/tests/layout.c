/* layout.c - prints the shared cache layout as the C compiler sees it, one
 * "<struct>.<field> <offset> <size>" line per field, for the Python reader's
 * agreement test. */
#include <stddef.h>
#include <stdio.h>

#include "../sharedcache.h"

#define F(type, field)                                                                             \
    printf("%s.%s %zu %zu\n", #type, #field, offsetof(struct type, field),                         \
           sizeof(((struct type *)0)->field))

int main(void) {
    printf("vgpu_cache.size 0 %zu\n", sizeof(struct vgpu_cache));
    printf("magic 0 %u\nversion 0 %u\n", VGPU_CACHE_MAGIC, VGPU_CACHE_VERSION);
    F(vgpu_cache, header);
    F(vgpu_cache, devices);
    F(vgpu_cache, accounts);
    F(vgpu_cache, slots);
    F(vgpu_cache_header, magic);
    F(vgpu_cache_header, version);
    F(vgpu_cache_header, header_bytes);
    F(vgpu_cache_header, device_count);
    F(vgpu_cache_header, slot_count);
    F(vgpu_cache_header, device_bytes);
    F(vgpu_cache_header, slot_bytes);
    F(vgpu_cache_header, sm_policy);
    F(vgpu_cache_header, creator_pid);
    F(vgpu_cache_header, created_ns);
    F(vgpu_cache_device, limit_bytes);
    F(vgpu_cache_account, used);
    F(vgpu_cache_device, sm_limit_percent);
    F(vgpu_cache_device, sm_observed_ns);
    F(vgpu_cache_slot, pid);
    F(vgpu_cache_slot, generation);
    F(vgpu_cache_slot, start_ticks);
    F(vgpu_cache_slot, last_kernel_ns);
    F(vgpu_cache_slot, launches);
    F(vgpu_cache_slot, op_seq);
    F(vgpu_cache_slot, op);
    F(vgpu_cache_slot, charged);
    return 0;
}
