# Cross-compile for 64-bit ARM Linux (Raspberry Pi 4/5 running a 64-bit OS)
# with Debian's cross toolchain:
#
#   apt-get install g++-aarch64-linux-gnu        # compiler + /usr/aarch64-linux-gnu
#   cmake -S runtime -B build/runtime/_build/aarch64 \
#         -DCMAKE_TOOLCHAIN_FILE=runtime/cmake/aarch64-linux-gnu.toolchain.cmake \
#         -DEXECUTORCH_PACKAGE_DIR=<unpacked manylinux_2_28_aarch64 wheel>/executorch
#
# The executorch aarch64 wheel has the same include/, lib/ and share/cmake/
# layout as the host one. Binaries linked against Debian 12's sysroot need
# glibc >= 2.34 on the device (Raspberry Pi OS Bookworm has 2.36).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(VITQ_CROSS_TRIPLE "aarch64-linux-gnu" CACHE STRING "GNU triple of the cross toolchain")
set(CMAKE_C_COMPILER "${VITQ_CROSS_TRIPLE}-gcc")
set(CMAKE_CXX_COMPILER "${VITQ_CROSS_TRIPLE}-g++")

# Debian's multiarch cross packages install the target's libc, libstdc++ and
# headers under /usr/<triple>; the compiler already knows this, CMake's own
# find_* calls are pointed there too.
set(CMAKE_FIND_ROOT_PATH "/usr/${VITQ_CROSS_TRIPLE}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)  # build tools run on the host
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# BOTH: the executorch CMake package lives in the unpacked wheel, outside the
# sysroot (its config resolves paths relative to itself, so no rerooting).
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# Lets CMake (try_run, ctest) execute target binaries on an x86 host.
find_program(VITQ_QEMU_AARCH64 qemu-aarch64)
if(VITQ_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${VITQ_QEMU_AARCH64};-L;/usr/${VITQ_CROSS_TRIPLE}")
endif()
