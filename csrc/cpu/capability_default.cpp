// scorefast._C_default: the CPU kernels built for the DEFAULT instruction set (flags in setup.py).
#define SF_CAPABILITY_NAME "DEFAULT"
#include "kernels_impl.h"
