// JSON values in localStorage, falling back to memory where storage is disabled or full.

export class JsonStorage {
  constructor(backend = globalThis.localStorage) {
    this.backend = backend;
    this.memory = new Map();
  }

  get(key, fallback = null) {
    let text = null;
    try {
      text = this.backend ? this.backend.getItem(key) : null;
    } catch {
      text = null;
    }
    if (text === null) {
      return this.memory.has(key) ? this.memory.get(key) : fallback;
    }
    try {
      return JSON.parse(text);
    } catch {
      return fallback;
    }
  }

  /** Stores `value` and returns false when only the in-memory copy was written (quota exceeded or storage disabled). */
  set(key, value) {
    this.memory.set(key, value);
    try {
      this.backend.setItem(key, JSON.stringify(value));
      return true;
    } catch (error) {
      console.warn("parley: could not write localStorage key", key, error);
      return false;
    }
  }

  remove(key) {
    this.memory.delete(key);
    try {
      this.backend.removeItem(key);
    } catch {
      // Storage is unavailable, so there is nothing left to remove.
    }
  }
}

/** Keys under which one user's state is kept, so that two users of one browser never mix positions or outboxes. */
export function userKeys(user) {
  return {
    rooms: `parley.user.${user}.rooms`,
    outbox: `parley.user.${user}.outbox`,
  };
}

export const CREDENTIALS_KEY = "parley.credentials";
