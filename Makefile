# points: PostgreSQL extension (PGXS)

EXTENSION = points
MODULE_big = points
OBJS = $(patsubst %.c,%.o,$(wildcard src/*.c))
DATA = $(wildcard sql/points--*.sql)

PG_CONFIG ?= pg_config
PG_CPPFLAGS = -Isrc
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = $(shell pkg-config --libs rdkafka)

# regression tests: sql/NAME.sql -> expected/NAME.out, run against a
# cluster that has the library preloaded (see .ci/run and the README)
REGRESS = earn use_order cancel expiry idempotency history archive verify bad_input privileges guc queue stats alerts daily worker_status fuzz events upgrade
REGRESS_OPTS = --inputdir=. --load-extension=points

# isolation specs: test/isolation/specs/NAME.spec -> test/isolation/expected/NAME.out
ISOLATION = $(sort $(basename $(notdir $(wildcard test/isolation/specs/*.spec))))
ISOLATION_OPTS = --inputdir=test/isolation --load-extension=points

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object depends on the shared header (PGXS tracks no header
# dependencies): a changed struct must never leave a stale object behind
$(OBJS): src/points.h
