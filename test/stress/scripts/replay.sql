-- an idempotent earn or use whose key fixes its operation and amount: the
-- first call applies it, every later one must replay the same transaction
\set hot random(1, 100)
\set u case when :hot <= 60 then random(1, 5) else random(1000, 1100) end
\set n random(1, 30)
\set op random(0, 1)
SELECT stress.replay(:u, :n, :op);
