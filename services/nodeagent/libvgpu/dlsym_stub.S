/*
 * dlsym_stub.S - libvgpu's exported dlsym and dlvsym.
 *
 * glibc's dlsym and dlvsym resolve RTLD_NEXT relative to their caller, found
 * from the return address.  A C wrapper that called the real function would
 * make libvgpu the caller and break RTLD_NEXT for every other library
 * (HAMi#2903), so the entries are written here: ask vgpu_dlsym_hook /
 * vgpu_dlvsym_hook for a wrapper, and if it has none, restore the arguments
 * and jump (not call) to the real function with the original return address
 * still on the stack.
 */
#if defined(__x86_64__)
    .text
    .globl  dlsym
    .type   dlsym, @function
dlsym:
    .cfi_startproc
    pushq   %rdi
    .cfi_adjust_cfa_offset 8
    pushq   %rsi
    .cfi_adjust_cfa_offset 8
    subq    $8, %rsp                /* 16-byte stack alignment for the call */
    .cfi_adjust_cfa_offset 8
    call    vgpu_dlsym_hook
    addq    $8, %rsp
    .cfi_adjust_cfa_offset -8
    popq    %rsi
    .cfi_adjust_cfa_offset -8
    popq    %rdi
    .cfi_adjust_cfa_offset -8
    testq   %rax, %rax
    jnz     1f
    movq    vgpu_real_dlsym(%rip), %rax
    testq   %rax, %rax
    jz      1f                      /* no real dlsym: answer NULL */
    jmp     *%rax
1:
    ret
    .cfi_endproc
    .size   dlsym, .-dlsym

    .globl  dlvsym
    .type   dlvsym, @function
dlvsym:
    .cfi_startproc
    pushq   %rdi
    .cfi_adjust_cfa_offset 8
    pushq   %rsi
    .cfi_adjust_cfa_offset 8
    pushq   %rdx                    /* three pushes: 16-byte aligned for the call */
    .cfi_adjust_cfa_offset 8
    call    vgpu_dlvsym_hook
    popq    %rdx
    .cfi_adjust_cfa_offset -8
    popq    %rsi
    .cfi_adjust_cfa_offset -8
    popq    %rdi
    .cfi_adjust_cfa_offset -8
    testq   %rax, %rax
    jnz     1f
    movq    vgpu_real_dlvsym(%rip), %rax
    testq   %rax, %rax
    jz      1f                      /* no real dlvsym: answer NULL */
    jmp     *%rax
1:
    ret
    .cfi_endproc
    .size   dlvsym, .-dlvsym
#elif defined(__aarch64__)
    .text
    .globl  dlsym
    .type   dlsym, %function
dlsym:
    stp     x29, x30, [sp, #-32]!
    mov     x29, sp
    stp     x0, x1, [sp, #16]
    bl      vgpu_dlsym_hook
    cbnz    x0, 1f
    ldp     x0, x1, [sp, #16]
    ldp     x29, x30, [sp], #32
    adrp    x16, vgpu_real_dlsym
    ldr     x16, [x16, :lo12:vgpu_real_dlsym]
    cbz     x16, 2f
    br      x16
1:
    ldp     x29, x30, [sp], #32
    ret
2:
    mov     x0, #0                  /* no real dlsym: answer NULL */
    ret
    .size   dlsym, .-dlsym

    .globl  dlvsym
    .type   dlvsym, %function
dlvsym:
    stp     x29, x30, [sp, #-48]!
    mov     x29, sp
    stp     x0, x1, [sp, #16]
    str     x2, [sp, #32]
    bl      vgpu_dlvsym_hook
    cbnz    x0, 1f
    ldp     x0, x1, [sp, #16]
    ldr     x2, [sp, #32]
    ldp     x29, x30, [sp], #48
    adrp    x16, vgpu_real_dlvsym
    ldr     x16, [x16, :lo12:vgpu_real_dlvsym]
    cbz     x16, 2f
    br      x16
1:
    ldp     x29, x30, [sp], #48
    ret
2:
    mov     x0, #0                  /* no real dlvsym: answer NULL */
    ret
    .size   dlvsym, .-dlvsym
#else
#error "libvgpu's dlsym stub supports x86_64 and aarch64"
#endif
    .section .note.GNU-stack,"",%progbits
