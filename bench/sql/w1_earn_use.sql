-- W1: earn/use 80/20 over 100k users (the users were funded at setup)
\set u random(1, :users)
\set r random(1, 100)
\if :r <= 80
SELECT points.earn(:u, 10);
\else
SELECT points.use(:u, 5);
\endif
