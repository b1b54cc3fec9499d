// scorefast._C_avx512: the CPU kernels built for the AVX512 instruction set (flags in setup.py).
#define SF_CAPABILITY_NAME "AVX512"
#include "kernels_impl.h"
