# duplex - build, test and run. See README.md.
#
#   make            build the three programs into build/bin
#   make run        start a local cluster, show it, stop it
#   make test       unit + system tests, then again under ASan/UBSan (what CI runs)
#   make unit       the fast loop: unit tests + fuzz-corpus replay, one plain build
#   make check      unit + system tests on one plain build (K=NAME, M=MARKEXPR select)
#   make bench      micro-benchmarks (results go in docs/BENCHMARKS.md)
#
# Objects go under $(BUILD) (default build/); SANITIZE=1 adds ASan + UBSan.

BUILD    ?= build
SANITIZE ?=
PREFIX   ?= /usr/local
DESTDIR  ?=
# systemd units (systemd/*.service) and the example settings file
SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
PYTHON   := /usr/bin/python3
CC       ?= cc
CLANG    ?= clang
FUZZ_SECONDS ?= 60

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
NPROC := $(shell nproc 2>/dev/null || echo 2)

# Debian packages the build, the tests and `make run` need.
DEB_PKGS := gcc make libzmq3-dev libuv1-dev libsqlite3-dev protobuf-c-compiler \
            libprotobuf-c-dev libjansson-dev libopenblas-dev libcriterion-dev uthash-dev \
            python3-pytest python3-pytest-xdist python3-zmq libsystemd-dev systemd
# Extra packages for lint, format and fuzz.
DEB_DEV_PKGS := clang clang-tidy cppcheck clang-format

CFLAGS_ALL := -std=gnu11 -Wall -Wextra -Werror -Wno-format-truncation -g -O2 -MMD -MP -I. -I$(BUILD)/gen \
              -D_FORTIFY_SOURCE=2 $(CFLAGS)
LDFLAGS_ALL := $(LDFLAGS)
# The CUDA, NCCL and cuBLASLt headers, where installed: only the ABI tests
# (tests/unit/test_*_abi.c) include them, to check the declarations that
# worker/cuda/driver.c, cuda/comm/nccl.c and cuda/cublas.c make themselves;
# the build needs none.
CUDA_HOME ?= /usr/local/cuda
CUDA_HEADERS := $(firstword $(wildcard $(CUDA_HOME)/include/cublasLt.h))
ifeq ($(SANITIZE),1)
CFLAGS_ALL += -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
              -U_FORTIFY_SOURCE
LDFLAGS_ALL += -fsanitize=address,undefined
endif
LIBS := -lzmq -luv -lsqlite3 -lprotobuf-c -ljansson -lopenblas -lsystemd -ldl -lpthread -lm

PROTO_C := $(BUILD)/gen/proto/duplex.pb-c.c
PROTO_H := $(BUILD)/gen/proto/duplex.pb-c.h

COMMON_SRC := common/log.c common/opts.c common/fs.c common/zwatch.c common/ratelimit.c common/loop.c \
              common/ckpt.c common/sdnotify.c common/zmonitor.c common/loopstat.c \
              proto/envelope.c proto/wire.c proto/cert.c proto/authz.c
PIPE_SRC   := pipeline/schedule.c pipeline/gen_1f1b.c pipeline/gen_dualpipe.c pipeline/validate.c \
              pipeline/simulate.c pipeline/render.c pipeline/executor.c
# the job model the three programs share (docs/ARCHITECTURE.md, "Rooms")
JOB_SRC    := $(wildcard job/*.c)
COORD_SRC  := $(filter-out coordinator/main.c,$(wildcard coordinator/*.c))
WORKER_SRC := $(filter-out worker/main.c,$(wildcard worker/*.c)) \
              $(foreach d,net sim rank cpu model cuda cuda/comm cuda/model,$(wildcard worker/$(d)/*.c))
KREF_SRC   := $(wildcard kernels/*_ref.c) kernels/ref.c
CTL_SRC    := ctl/client.c ctl/keys.c ctl/local.c ctl/workers.c ctl/plan.c ctl/place.c ctl/submit.c ctl/jobs.c
UNIT_SRC   := $(wildcard tests/unit/test_*.c)
BENCH_SRC  := $(wildcard bench/bench_*.c)

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))

COMMON_OBJ := $(call obj,$(COMMON_SRC)) $(BUILD)/obj/gen/proto/duplex.pb-c.o
PIPE_OBJ   := $(call obj,$(PIPE_SRC))
JOB_OBJ    := $(call obj,$(JOB_SRC))
COORD_OBJ  := $(call obj,$(COORD_SRC))
WORKER_OBJ := $(call obj,$(WORKER_SRC))
CTL_OBJ    := $(call obj,$(CTL_SRC))
KREF_OBJ   := $(call obj,$(KREF_SRC))
LIB_COMMON := $(BUILD)/lib/libdxcommon.a
LIB_PIPE   := $(BUILD)/lib/libdxpipe.a
LIB_JOB    := $(BUILD)/lib/libdxjob.a
LIB_COORD  := $(BUILD)/lib/libdxcoord.a
LIB_WORKER := $(BUILD)/lib/libdxworker.a
LIB_CTL    := $(BUILD)/lib/libdxctl.a
# CPU references of the CUDA kernels (kernels/ref.c); tests link them
LIB_KREF   := $(BUILD)/lib/libdxkref.a
# the CUDA kernels' images (see "CUDA kernels" below), where nvcc is found:
# then the worker links them (worker/cuda/gpu.c, DX_HAVE_KERNELS)
ifeq ($(origin NVCC),undefined)
NVCC := $(shell command -v nvcc 2>/dev/null)
endif
LIB_KERNELS := $(BUILD)/lib/libdxkernels.a
WITH_KERNELS := $(if $(NVCC),$(LIB_KERNELS))
ALL_LIBS   := $(LIB_CTL) $(LIB_WORKER) $(LIB_COORD) $(LIB_JOB) $(LIB_PIPE) $(LIB_KREF) $(LIB_COMMON)

BINS       := $(BUILD)/bin/duplexd $(BUILD)/bin/duplex-worker $(BUILD)/bin/duplexctl
UNIT_BINS  := $(patsubst tests/unit/%.c,$(BUILD)/tests/unit/%,$(UNIT_SRC))
BENCH_BINS := $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_SRC))
# libFuzzer targets (tests/fuzz/fuzz_NAME.c, corpus tests/fuzz/corpus_NAME/),
# replayed over their corpus by make test. FUZZ_EXTRA_NAME: sources beyond
# $(COMMON_SRC) that target NAME links.
FUZZ_TARGETS := envelope ckpt cert authz
FUZZ_REPLAY := $(patsubst %,$(BUILD)/tests/fuzz/fuzz_%_replay,$(FUZZ_TARGETS))

.PHONY: all deps deps-dev test test-build unit check run bench format format-check lint fuzz install \
        uninstall clean kernels gpucheck bundle
.DEFAULT_GOAL := all

all: $(BINS) kernels

deps:
	@missing=$$(for p in $(DEB_PKGS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

deps-dev: deps
	@$(MAKE) --no-print-directory deps DEB_PKGS="$(DEB_DEV_PKGS)"

# --- generated protocol code ------------------------------------------------

$(PROTO_C) $(PROTO_H) &: proto/duplex.proto
	@mkdir -p $(BUILD)/gen
	protoc-c --c_out=$(BUILD)/gen proto/duplex.proto

# --- objects and libraries ----------------------------------------------------

$(BUILD)/obj/gen/%.o: $(BUILD)/gen/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Wno-unused-parameter -c $< -o $@

$(BUILD)/obj/%.o: %.c | $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

$(LIB_COMMON): $(COMMON_OBJ)
$(LIB_PIPE): $(PIPE_OBJ)
$(LIB_JOB): $(JOB_OBJ)
$(LIB_COORD): $(COORD_OBJ)
$(LIB_WORKER): $(WORKER_OBJ)
$(LIB_CTL): $(CTL_OBJ)
$(LIB_KREF): $(KREF_OBJ)
# the references must round like the kernels, and the worker's model like
# both (the GPU checks compare bitwise): no fused multiply-add, on any target
$(KREF_OBJ) $(call obj,$(wildcard worker/model/*.c)): CFLAGS_ALL += -ffp-contract=off
$(ALL_LIBS):
	@mkdir -p $(dir $@)
	rm -f $@ && $(AR) rcs $@ $^

# duplexd alone links coordinator/; the worker and duplexctl share job/
$(BUILD)/bin/duplexd: $(BUILD)/obj/coordinator/main.o $(LIB_COORD) $(LIB_JOB) $(LIB_PIPE) $(LIB_COMMON)
$(BUILD)/bin/duplex-worker: $(BUILD)/obj/worker/main.o $(LIB_WORKER) $(WITH_KERNELS) $(LIB_JOB) \
                            $(LIB_PIPE) $(LIB_KREF) $(LIB_COMMON)
ifneq ($(NVCC),)
$(BUILD)/obj/worker/cuda/gpu.o: CFLAGS_ALL += -DDX_HAVE_KERNELS
endif
$(BUILD)/bin/duplexctl: $(BUILD)/obj/ctl/main.o $(LIB_CTL) $(LIB_JOB) $(LIB_PIPE) $(LIB_COMMON)
$(BINS):
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $^ $(LIBS)

# --- CUDA kernels ------------------------------------------------------------
# kernels/NAME.cu -> $(BUILD)/kernels/NAME.ptx (nvcc) -> NAME.cubin (ptxas, its
# resource report in NAME.ptxas.txt) -> $(BUILD)/gen/kernels/NAME_{ptx,cubin}.c
# (symbols dx_kernel_NAME_ptx / _cubin and their _len) -> libdxkernels.a, for
# a loader to cuModuleLoadData. Built when nvcc is found; a kernel that does
# not assemble fails the build.

ifeq ($(origin PTXAS),undefined)
PTXAS := $(if $(NVCC),$(or $(wildcard $(dir $(NVCC))ptxas),$(shell command -v ptxas 2>/dev/null)))
endif
CUDA_ARCH   ?= sm_90
NVCC_FLAGS  ?= -std=c++17 -O3 -lineinfo
KERNEL_SRC  := $(wildcard kernels/*.cu)
KERNEL_NAMES := $(patsubst kernels/%.cu,%,$(KERNEL_SRC))
KERNEL_GEN  := $(foreach k,$(KERNEL_NAMES),$(BUILD)/gen/kernels/$(k)_ptx.c \
                 $(BUILD)/gen/kernels/$(k)_cubin.c)

ifneq ($(NVCC),)
kernels: $(LIB_KERNELS)
else
kernels:
	@echo "kernels: nvcc not found on PATH, CUDA kernels (kernels/*.cu) not built"
endif

$(BUILD)/kernels/%.ptx: kernels/%.cu kernels/ptx.cuh
	@mkdir -p $(dir $@)
	$(NVCC) -arch=$(CUDA_ARCH) $(NVCC_FLAGS) -ptx $< -o $@.tmp && mv $@.tmp $@ || \
	  { rm -f $@.tmp; exit 1; }

$(BUILD)/kernels/%.cubin $(BUILD)/kernels/%.ptxas.txt: $(BUILD)/kernels/%.ptx
	@echo "ptxas -arch=$(CUDA_ARCH) -O3 -v $< -o $(BUILD)/kernels/$*.cubin"
	@if $(PTXAS) -arch=$(CUDA_ARCH) -O3 -v $< -o $(BUILD)/kernels/$*.cubin \
	    > $(BUILD)/kernels/$*.ptxas.txt 2>&1; then :; else \
	  cat $(BUILD)/kernels/$*.ptxas.txt; rm -f $(BUILD)/kernels/$*.cubin; exit 1; \
	fi

$(BUILD)/gen/kernels/%_ptx.c: $(BUILD)/kernels/%.ptx kernels/embed.py
	@mkdir -p $(dir $@)
	$(PYTHON) kernels/embed.py $< $@ dx_kernel_$*_ptx --text

$(BUILD)/gen/kernels/%_cubin.c: $(BUILD)/kernels/%.cubin kernels/embed.py
	@mkdir -p $(dir $@)
	$(PYTHON) kernels/embed.py $< $@ dx_kernel_$*_cubin

# keep the chain's steps (make would delete them as intermediates)
.SECONDARY: $(foreach k,$(KERNEL_NAMES),$(BUILD)/kernels/$(k).ptx $(BUILD)/kernels/$(k).cubin \
              $(BUILD)/kernels/$(k).ptxas.txt) $(KERNEL_GEN)

$(LIB_KERNELS): $(patsubst $(BUILD)/gen/%.c,$(BUILD)/obj/gen/%.o,$(KERNEL_GEN))
	@mkdir -p $(dir $@)
	rm -f $@ && $(AR) rcs $@ $^

# --- GPU check and the bundle for a GPU host --------------------------------
# duplex-gpucheck (tests/gpu/gpucheck.c) runs every embedded kernel against
# its CPU reference; it needs libdxkernels.a, so nvcc. `make bundle` copies
# the programs, duplex-gpucheck and every shared library ldd resolves for
# them (but glibc's own: libc, libm, libpthread, libdl, librt, libresolv, the
# loader, which must match the host's)
# into $(BUILD)/bundle/{bin,lib}, with tests/gpu/run.sh and examples/, and
# packs it as $(BUILD)/bundle.tar.gz: a GPU host then needs only glibc and
# the NVIDIA driver (see tests/gpu/run.sh).

GPUCHECK   := $(BUILD)/bin/duplex-gpucheck
BUNDLE     := $(BUILD)/bundle
BUNDLE_MAX_MIB := 60
BUNDLE_SYSTEM_LIBS := libc.so% libm.so% libpthread.so% libdl.so% librt.so% libresolv.so% ld-linux%

ifneq ($(NVCC),)
gpucheck: $(GPUCHECK)

GPUCHECK_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard tests/gpu/*.c))

$(GPUCHECK): $(GPUCHECK_OBJ) $(LIB_WORKER) $(LIB_KREF) $(LIB_KERNELS) $(LIB_COMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $^ -lopenblas -ldl -lm

bundle: $(BINS) $(GPUCHECK)
	rm -rf $(BUNDLE) $(BUNDLE).tar.gz
	mkdir -p $(BUNDLE)/bin $(BUNDLE)/lib
	cp $(BINS) $(GPUCHECK) $(BUNDLE)/bin/
	@libs=$$(ldd $(BINS) $(GPUCHECK) | awk '$$2 == "=>" && $$3 ~ /^\// { print $$3 }' | \
	  sort -u); \
	missing=$$(ldd $(BINS) $(GPUCHECK) | grep 'not found'); \
	if [ -n "$$missing" ]; then echo "bundle: unresolved: $$missing"; exit 1; fi; \
	for l in $$libs; do \
	  case "$$(basename $$l)" in \
	    $(subst %,*,$(subst $() ,|,$(strip $(BUNDLE_SYSTEM_LIBS))))) ;; \
	    *) cp -L $$l $(BUNDLE)/lib/ || exit 1 ;; \
	  esac; \
	done
	cp tests/gpu/run.sh $(BUNDLE)/run.sh
	cp tests/gpu/train_check.py $(BUNDLE)/train_check.py
	chmod 0755 $(BUNDLE)/run.sh $(BUNDLE)/train_check.py
	cp -r examples $(BUNDLE)/examples
	@mib=$$(du -sm $(BUNDLE) | cut -f1); \
	echo "bundle: $(BUNDLE) $$mib MiB:" $$(ls $(BUNDLE)/lib); \
	if [ $$mib -gt $(BUNDLE_MAX_MIB) ]; then \
	  echo "bundle: over $(BUNDLE_MAX_MIB) MiB"; exit 1; fi
	tar -C $(dir $(BUNDLE)) -czf $(BUNDLE).tar.gz $(notdir $(BUNDLE))
	@echo "bundle: $(BUNDLE).tar.gz ($$(du -h $(BUNDLE).tar.gz | cut -f1))"
else
gpucheck bundle:
	@echo "$@: nvcc not found on PATH: the kernels, so duplex-gpucheck, cannot be built"; exit 1
endif

# --- the fake GPU stack for the tests -----------------------------------------
# libfakecuda.so (tests/fake/): the Driver API on host memory, its kernels the
# CPU references of kernels/ (built into it, position-independent), so the
# tests run the code that drives a GPU on machines without one.
LIB_FAKECUDA := $(BUILD)/lib/libfakecuda.so
FAKECUDA_SRC := $(wildcard tests/fake/*.c) $(KREF_SRC)
FAKECUDA_OBJ := $(patsubst %.c,$(BUILD)/obj-pic/%.o,$(FAKECUDA_SRC))

$(BUILD)/obj-pic/%.o: %.c | $(PROTO_H)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -fPIC -fvisibility=hidden -ffp-contract=off -c $< -o $@
# Under SANITIZE=1 the fake keeps ASan and UBSan but is optimised as in the
# plain build (-O2 after the sanitizer build's -O1): its kernels and GEMMs
# are most of a fake-GPU test's time. The same checks run, and the results
# are the same bits (no fast-math; -ffp-contract=off at every level).
ifeq ($(SANITIZE),1)
$(FAKECUDA_OBJ): CFLAGS_ALL += -O2
endif

$(LIB_FAKECUDA): $(FAKECUDA_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -shared -o $@ $^ -lpthread -lm

# --- tests ------------------------------------------------------------------

ifneq ($(CUDA_HEADERS),)
$(BUILD)/obj/tests/unit/%_abi.o: CFLAGS_ALL += -DDX_HAVE_CUDA_HEADERS -isystem $(CUDA_HOME)/include \
                                               -isystem /usr/local/include
endif

$(BUILD)/tests/unit/%: $(BUILD)/obj/tests/unit/%.o $(ALL_LIBS) $(WITH_KERNELS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $< $(LIB_CTL) $(LIB_WORKER) $(WITH_KERNELS) $(LIB_COORD) $(LIB_JOB) \
	    $(LIB_PIPE) $(LIB_KREF) $(LIB_COMMON) $(LIBS) -lcriterion

$(foreach t,$(FUZZ_TARGETS),$(if $(FUZZ_EXTRA_$(t)),$(eval \
  $(BUILD)/tests/fuzz/fuzz_$(t)_replay: $(call obj,$(FUZZ_EXTRA_$(t))))))
$(BUILD)/tests/fuzz/fuzz_%_replay: $(BUILD)/obj/tests/fuzz/fuzz_%.o \
                                   $(BUILD)/obj/tests/fuzz/replay_main.o $(LIB_COMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $(filter %.o,$^) $(LIB_COMMON) $(LIBS)

test-build: $(BINS) $(UNIT_BINS) $(FUZZ_REPLAY) $(LIB_FAKECUDA) \
            $(BUILD)/bench/bench_fleet $(if $(NVCC),$(BUILD)/bin/duplex-gpucheck)

# Plain pass, then the same tests on an ASan + UBSan build in build/asan.
test: deps
	$(PYTHON) scripts/check_rooms.py
	@$(MAKE) --no-print-directory -j$(NPROC) test-build
	@$(MAKE) --no-print-directory -j$(NPROC) test-build BUILD=build/asan SANITIZE=1
	$(PYTHON) tests/run.py build build/asan

# The fast loop, on one plain build ($(BUILD)), no sanitizers: `make unit`
# runs the unit tests and the fuzz-corpus replay, `make check` those and
# the system tests. K=NAME and M=MARKEXPR go to tests/run.py as -k and -m
# (make unit K=jobs/*, make check K=test_recovery M='not fake_gpu').
RUN_SELECT = $(if $(K),-k '$(K)') $(if $(M),-m '$(M)')
unit: deps
	@$(MAKE) --no-print-directory -j$(NPROC) $(UNIT_BINS) $(FUZZ_REPLAY) $(LIB_FAKECUDA)
	$(PYTHON) tests/run.py --stage unit --stage fuzz $(RUN_SELECT) $(BUILD)

check: deps
	@$(MAKE) --no-print-directory -j$(NPROC) test-build
	$(PYTHON) tests/run.py $(RUN_SELECT) $(BUILD)

# --- run, bench -------------------------------------------------------------

run: deps
	@$(MAKE) --no-print-directory -j$(NPROC) all
	scripts/demo.sh $(BUILD)

# BENCH_EXTRA_NAME: sources beyond bench/NAME.c that bench NAME links (the
# simulated workers' shared module, bench/simfleet.c, is no bench itself)
BENCH_EXTRA_bench_curve := bench/simfleet.c
BENCH_EXTRA_bench_fleet := bench/simfleet.c
$(foreach b,$(patsubst bench/%.c,%,$(BENCH_SRC)),$(if $(BENCH_EXTRA_$(b)),$(eval \
  $(BUILD)/bench/$(b): $(call obj,$(BENCH_EXTRA_$(b))))))
$(BUILD)/bench/%: $(BUILD)/obj/bench/%.o $(ALL_LIBS) $(WITH_KERNELS)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $(filter %.o,$^) $(LIB_CTL) $(LIB_WORKER) $(WITH_KERNELS) $(LIB_COORD) \
	    $(LIB_JOB) $(LIB_PIPE) $(LIB_KREF) $(LIB_COMMON) $(LIBS)
# they run BUILD/bin/duplexd
$(BUILD)/bench/bench_curve $(BUILD)/bench/bench_fleet: $(BUILD)/bin/duplexd

bench: deps
	@$(MAKE) --no-print-directory -j$(NPROC) $(BENCH_BINS)
	@for b in $(BENCH_BINS); do echo "== $$b"; $$b || exit 1; done
	@echo "== bench/bench_cluster.py $(BUILD)"; /usr/bin/python3 bench/bench_cluster.py $(BUILD)
	@echo "== bench/bench_recovery.py $(BUILD)"; /usr/bin/python3 bench/bench_recovery.py $(BUILD)

# --- fuzz, format, lint -----------------------------------------------------

FUZZ_BINS := $(patsubst %,$(BUILD)/fuzz/fuzz_%,$(FUZZ_TARGETS))
$(foreach t,$(FUZZ_TARGETS),$(if $(FUZZ_EXTRA_$(t)),$(eval \
  $(BUILD)/fuzz/fuzz_$(t): $(FUZZ_EXTRA_$(t)))))
$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(COMMON_SRC) $(PROTO_C)
	@mkdir -p $(dir $@)
	$(CLANG) -std=gnu11 -g -O1 -I. -I$(BUILD)/gen -fsanitize=fuzzer,address,undefined \
	  -o $@ $< $(COMMON_SRC) $(FUZZ_EXTRA_$*) $(PROTO_C) $(LIBS)

# FUZZ_SECONDS per target; new finds land in build/fuzz/corpus_NAME
fuzz: deps-dev
	@$(MAKE) --no-print-directory $(FUZZ_BINS)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(BUILD)/fuzz/corpus_$$t && \
	  $(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
	    $(BUILD)/fuzz/corpus_$$t tests/fuzz/corpus_$$t || exit 1; \
	done

FORMAT_FILES = $(shell git ls-files '*.c' '*.h' 2>/dev/null)

format: deps-dev
	clang-format -i $(FORMAT_FILES)

format-check: deps-dev
	clang-format --dry-run --Werror $(FORMAT_FILES)

LINT_DIRS := common proto pipeline job coordinator ctl kernels tests/gpu tests/fake \
             worker $(addprefix worker/,net sim rank model cuda cuda/comm cuda/model)

# The rooms' include rule (docs/ARCHITECTURE.md), cppcheck, then clang-tidy
# with the checks in .clang-tidy (all must pass).
lint: deps-dev $(PROTO_H)
	$(PYTHON) scripts/check_rooms.py
	cppcheck --quiet --error-exitcode=1 --std=c11 --enable=warning,performance,portability \
	  --inline-suppr --suppress=missingIncludeSystem -I. -I$(BUILD)/gen $(LINT_DIRS)
	clang-tidy --quiet $(foreach d,$(LINT_DIRS),$(wildcard $(d)/*.c)) -- -std=gnu11 -I. -I$(BUILD)/gen

# --- install ----------------------------------------------------------------

SYSTEMD_UNITS := duplexd.service duplex-worker@.service

# The units' /usr/local and /etc/duplex paths follow PREFIX and SYSCONFDIR.
# The settings file $(SYSCONFDIR)/duplex/duplex.env is only written when
# absent (it is the operator's); uninstall removes it only while it is still
# the example.
install: $(BINS)
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BINS) $(DESTDIR)$(PREFIX)/bin/
	install -d $(DESTDIR)$(PREFIX)/share/doc/duplex
	install -m 0644 README.md docs/*.md $(DESTDIR)$(PREFIX)/share/doc/duplex/
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	for u in $(SYSTEMD_UNITS); do \
	  sed -e 's|/usr/local/|$(PREFIX)/|g' -e 's|/etc/duplex/|$(SYSCONFDIR)/duplex/|g' \
	    systemd/$$u > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$u && \
	  chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$u || exit 1; \
	done
	install -d $(DESTDIR)$(SYSCONFDIR)/duplex
	[ -e $(DESTDIR)$(SYSCONFDIR)/duplex/duplex.env ] || \
	  install -m 0644 systemd/duplex.env $(DESTDIR)$(SYSCONFDIR)/duplex/duplex.env
	install -d $(DESTDIR)$(PREFIX)/lib/sysusers.d
	install -m 0644 systemd/duplex.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/duplex.conf

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,duplexd duplex-worker duplexctl)
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/duplex
	rm -f $(addprefix $(DESTDIR)$(SYSTEMD_UNIT_DIR)/,$(SYSTEMD_UNITS))
	rm -f $(DESTDIR)$(PREFIX)/lib/sysusers.d/duplex.conf
	! cmp -s systemd/duplex.env $(DESTDIR)$(SYSCONFDIR)/duplex/duplex.env || \
	  rm -f $(DESTDIR)$(SYSCONFDIR)/duplex/duplex.env
	rmdir $(DESTDIR)$(SYSCONFDIR)/duplex 2>/dev/null || true

clean:
	rm -rf build

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
