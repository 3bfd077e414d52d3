-- What a status means beyond its reason, where there is more to say: when a temporary ban
-- ends, why a connection could not be made. Written with every status change (a change
-- without details clears them), shown as `statusDetails`.
ALTER TABLE sessions ADD COLUMN status_details jsonb;
