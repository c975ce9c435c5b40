/* placeholder, being written */
#include "tests/gpu/gpucheck.h"
void gc_check_twohop(struct gc *g)
{
    (void)g;
}
