-- Queued earns (issue 8): earn_async on one hot user
SELECT points.earn_async(1, 10);
