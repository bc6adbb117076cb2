-- W2: earn on one hot user
SELECT points.earn(1, 10);
