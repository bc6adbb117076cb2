-- an earn for a hot user (1..5) or a cold one (1000..100000, skewed low so
-- that some cold users see several calls); a quarter expire within 0.2-3 s
\set hot random(1, 100)
\set u case when :hot <= 50 then random(1, 5) else random_exponential(1000, 100000, 8.0) end
\set amt random(1, 100)
\set short random(1, 100)
SELECT stress.earn(:u, :amt, :short <= 25);
