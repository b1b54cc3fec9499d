// scorefast._C_avx2: the CPU kernels built for the AVX2 instruction set (flags in setup.py).
#define SF_CAPABILITY_NAME "AVX2"
#include "kernels_impl.h"
