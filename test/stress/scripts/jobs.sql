-- archive everything (points.archive_after = 0) and expire what is due,
-- concurrently with the clients, a few times a second
SELECT stress.jobs();
\sleep 300 ms
