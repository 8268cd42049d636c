// The outbox: messages the user wrote that the server has not confirmed with `sent` yet.
//
// Entries live in localStorage, so a message written while offline or just before a reload is sent later with
// the same id, and the server's idempotence on (room, sender, id) stores it exactly once.

const MAX_RESEND_DOUBLINGS = 3;

/** Returns a fresh client message id: "w-" and 32 hex digits, inside the protocol's 64-character id alphabet. */
export function newMessageId(cryptoImpl = globalThis.crypto) {
  const bytes = new Uint8Array(16);
  cryptoImpl.getRandomValues(bytes);
  return "w-" + Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

export class Outbox {
  /**
   * @param storage a JsonStorage
   * @param key the localStorage key of this user's outbox
   */
  constructor(storage, key) {
    this.storage = storage;
    this.key = key;
    this.entries = [];
    this.removed = new Set();
    const saved = storage.get(key, []);
    if (Array.isArray(saved)) {
      for (const item of saved) {
        if (item && typeof item.room === "string" && typeof item.id === "string" && typeof item.body === "string") {
          // A loaded entry was never sent on this page, so it goes out on the first connection.
          this.entries.push({
            room: item.room,
            id: item.id,
            body: item.body,
            created: Number(item.created) || 0,
            failure: item.failure ?? null,
            attempts: 0,
            lastSent: null,
            notBefore: 0,
          });
        }
      }
    }
  }

  /**
   * Writes the outbox and keeps the entries that another tab of the same user added meanwhile. Without the merge,
   * the last tab to write would erase the other tab's unsent messages from storage.
   */
  save() {
    const merged = new Map();
    const saved = this.storage.get(this.key, []);
    for (const item of Array.isArray(saved) ? saved : []) {
      if (item && typeof item.id === "string" && !this.removed.has(item.id)) {
        merged.set(item.id, item);
      }
    }
    for (const { room, id, body, created, failure } of this.entries) {
      merged.set(id, { room, id, body, created, failure });
    }
    const stored = [...merged.values()].sort((a, b) => (a.created || 0) - (b.created || 0));
    this.storage.set(this.key, stored);
  }

  add(room, body, now, id = newMessageId()) {
    const entry = { room, id, body, created: now, failure: null, attempts: 0, lastSent: null, notBefore: 0 };
    this.entries.push(entry);
    this.save();
    return entry;
  }

  find(room, id) {
    return this.entries.find((entry) => entry.room === room && entry.id === id) ?? null;
  }

  /** Removes and returns the entry that the server confirmed as stored, or null when none is waiting. */
  confirm(room, id) {
    const index = this.entries.findIndex((entry) => entry.room === room && entry.id === id);
    if (index < 0) {
      return null;
    }
    const [entry] = this.entries.splice(index, 1);
    this.removed.add(entry.id);
    this.save();
    return entry;
  }

  /** Marks an entry as rejected by the server. It stays in the outbox, unsent, until retried or discarded. */
  fail(room, id, failure) {
    const entry = this.find(room, id);
    if (entry) {
      entry.failure = failure;
      this.save();
    }
    return entry;
  }

  retry(room, id) {
    const entry = this.find(room, id);
    if (entry) {
      entry.failure = null;
      entry.attempts = 0;
      entry.lastSent = null;
      entry.notBefore = 0;
      this.save();
    }
    return entry;
  }

  /** Holds back every entry of `room` until `until` ms, so that a rate-limited room keeps its order. */
  delayRoom(room, until) {
    for (const entry of this.entries) {
      if (entry.room === room) {
        entry.notBefore = Math.max(entry.notBefore, until);
        entry.lastSent = null;
      }
    }
  }

  discard(room, id) {
    return this.confirm(room, id);
  }

  dropRoom(room) {
    for (const entry of this.entries) {
      if (entry.room === room) {
        this.removed.add(entry.id);
      }
    }
    this.entries = this.entries.filter((entry) => entry.room !== room);
    this.save();
  }

  forRoom(room) {
    return this.entries.filter((entry) => entry.room === room);
  }

  /**
   * Lists the entries to send now, in the order they were written: those never sent on this connection, and
   * those unconfirmed for longer than `timeout` ms, doubled after each unanswered try (at most 8 × `timeout`).
   */
  due(now, timeout) {
    return this.entries.filter((entry) => {
      if (entry.failure || now < entry.notBefore) {
        return false;
      }
      if (entry.lastSent === null) {
        return true;
      }
      const wait = timeout * 2 ** Math.min(Math.max(entry.attempts - 1, 0), MAX_RESEND_DOUBLINGS);
      return now - entry.lastSent >= wait;
    });
  }

  markSent(entry, now) {
    entry.lastSent = now;
    entry.attempts += 1;
  }

  /** Forgets when each entry was last sent, so that every unconfirmed entry goes out again on the next connection. */
  resetConnection() {
    for (const entry of this.entries) {
      entry.lastSent = null;
      entry.attempts = 0;
    }
  }
}
