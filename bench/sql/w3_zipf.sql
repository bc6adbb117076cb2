-- W3: earn/use 80/20, users drawn from a zipfian distribution over
-- 1..:users (parameter :zipf; user 1 is the hottest)
\set u random_zipfian(1, :users, :zipf)
\set r random(1, 100)
\if :r <= 80
SELECT points.earn(:u, 10);
\else
SELECT points.use(:u, 5);
\endif
