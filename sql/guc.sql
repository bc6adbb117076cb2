-- settings: defaults, units, ranges and who may set them
SELECT name, setting, unit, context, vartype, min_val, max_val
FROM pg_settings WHERE name LIKE 'points.%' ORDER BY name;
SHOW points.lock_timeout;
SHOW points.default_validity;
SHOW points.archive_after;
SHOW points.kafka_topic;
SET points.lock_timeout = '200ms';
SHOW points.lock_timeout;
SET points.lock_timeout = 150;       -- bare number: milliseconds
SHOW points.lock_timeout;
SET points.lock_timeout = '-1';
SET points.lock_timeout = '1 fortnight';
RESET points.lock_timeout;
SET points.default_validity = '30d';
SHOW points.default_validity;
SET points.default_validity = 0;
SET points.default_validity = 3600;   -- bare number: seconds
SHOW points.default_validity;
RESET points.default_validity;
SET points.node_id = 8191;
SET points.node_id = 8192;
SET points.node_id = -1;
RESET points.node_id;
SET points.archive_after = -1;
-- worker settings change only on reload
SET points.expire_interval = '5s';
SET points.kafka_brokers = 'localhost:9092';
SET points.database = 'x';
-- the prefix is reserved
SET points.no_such_setting = 1;
-- who may set what
CREATE ROLE points_guc_user;
SET ROLE points_guc_user;
SET points.lock_timeout = '1s';
SHOW points.lock_timeout;
SET points.default_validity = '1d';
SET points.archive_after = '1d';
SET points.node_id = 1;
SHOW points.kafka_options;
RESET ROLE;
DROP ROLE points_guc_user;
