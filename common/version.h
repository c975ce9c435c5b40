/* version.h - the release of this source tree. */
#ifndef DX_VERSION_H
#define DX_VERSION_H

#define DX_VERSION "0.1.0"

#define DX_STRINGIFY_(x) #x
/* The text of a numeric macro, e.g. DX_STRINGIFY(DX_PROTOCOL_VERSION). */
#define DX_STRINGIFY(x) DX_STRINGIFY_(x)

#endif
