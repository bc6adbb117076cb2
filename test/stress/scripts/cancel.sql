-- a full or partial cancel of one of the user's recent earns or uses,
-- sometimes with an idempotency key derived from the target and amount
\set hot random(1, 100)
\set u case when :hot <= 60 then random(1, 5) else random_exponential(1000, 100000, 8.0) end
\set pick random(0, 5)
\set pct random(0, 100)
\set keyed random(1, 100)
SELECT stress.cancel_recent(:u, :pick, :pct, :keyed <= 30);
