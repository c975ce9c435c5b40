/* plan.c - `duplexctl plan` (being written). */
#include "ctl/ctl.h"
