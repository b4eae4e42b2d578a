// Self-test guest for insn_count (aarch64, static, no libc): two marker pairs
// (getppid = syscall 173) around loops of known length. Each span counts the
// instructions after the opening marker's svc up to and including the closing
// marker's svc:  2 (movs) + 3 * N (loop) + 2 (mov x8, svc)
// so the plugin must report "spans": [3004, 6004] (N = 1000, 2000).
// Built and run by tools/build_runtime.sh plugin.
    .text
    .global _start
_start:
    mov     x8, #173        // getppid: marker 0
    svc     #0
    mov     x0, #0
    mov     x1, #1000
1:  add     x0, x0, #1
    cmp     x0, x1
    b.ne    1b
    mov     x8, #173        // marker 1: span 0 = 3004
    svc     #0

    mov     x8, #173        // marker 2
    svc     #0
    mov     x0, #0
    mov     x1, #2000
2:  add     x0, x0, #1
    cmp     x0, x1
    b.ne    2b
    mov     x8, #173        // marker 3: span 1 = 6004
    svc     #0

    mov     x0, #0          // exit_group(0)
    mov     x8, #94
    svc     #0
