// Stand-in for CUDA's <cuda_runtime.h> in the CPU emulation (see cuda_emu.h). Tests only.
#pragma once

#include "cuda_emu.h"
