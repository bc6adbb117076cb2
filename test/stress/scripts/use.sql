-- a use: PT001 (not enough points) and 55P03 (lock timeout) are expected;
-- a third of them wait up to 1 s for the user instead of 100 ms, long enough
-- to outlast a holder (hold.sql) while the lot they want expires
\set hot random(1, 100)
\set u case when :hot <= 60 then random(1, 5) else random_exponential(1000, 100000, 8.0) end
\set amt random(1, 60)
\set patient random(1, 3)
SELECT stress.use(:u, :amt, NULL, :patient = 1);
