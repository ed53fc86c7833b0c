/* Library-level entry points: the ABI version, the params layout, error strings and the device probe. */
#include <cuda_runtime.h>

#include "encdec_abi.h"

ENCDEC_EXPORT int encdec_abi_version(void) { return ENCDEC_ABI_VERSION; }

ENCDEC_EXPORT size_t encdec_select_params_size(void) { return sizeof(encdec_select_params); }

ENCDEC_EXPORT const char* encdec_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

/* The only entry point that asks the runtime about devices; the loader calls it once. */
ENCDEC_EXPORT int encdec_probe(int* count) {
    *count = 0;
    return static_cast<int>(cudaGetDeviceCount(count));
}
