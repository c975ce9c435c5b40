/* version.h - the release of this source tree. */
#ifndef DX_VERSION_H
#define DX_VERSION_H

#define DX_VERSION "0.1.0"

#endif
