#!/bin/sh
# Temporal's databases and schema on its PostgreSQL, brought up to the admin-tools image's version. Every step
# leaves what exists as it is, so this runs on every `docker compose up`, and upgrades the schema when the
# Temporal images are bumped together.
set -eu
for database in temporal temporal_visibility; do
  case "$database" in
    temporal) schema=/etc/temporal/schema/postgresql/v12/temporal/versioned ;;
    *) schema=/etc/temporal/schema/postgresql/v12/visibility/versioned ;;
  esac
  temporal-sql-tool --plugin postgres12 --ep temporal-postgres -p 5432 -u temporal --db "$database" create
  temporal-sql-tool --plugin postgres12 --ep temporal-postgres -p 5432 -u temporal --db "$database" setup-schema -v 0.0
  temporal-sql-tool --plugin postgres12 --ep temporal-postgres -p 5432 -u temporal --db "$database" update-schema -d "$schema"
done
