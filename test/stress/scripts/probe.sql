-- an applied key reused with another amount must fail with PT002
\set u random(1, 5)
SELECT stress.probe_mismatch(:u);
