-- W2 baseline: the limit of one hot row
UPDATE pgbench_accounts SET abalance = abalance + 10 WHERE aid = 1;
