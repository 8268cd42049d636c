// User interface strings in English and Simplified Chinese, and locale-aware date formatting.

const STRINGS = {
  en: {
    appName: "Parley",
    language: "Language",
    skipToComposer: "Skip to message box",
    signInTitle: "Sign in",
    signInIntro: "Choose a user name to chat on this server, or sign in with an access token.",
    userName: "User name",
    userNameHint: "1 to 64 characters: letters, digits, . _ : -",
    useToken: "Sign in with an access token",
    token: "Access token",
    signIn: "Sign in",
    signOut: "Sign out",
    signedInAs: "Signed in as {user}",
    tokenRequired: "This server requires an access token. Enter one below.",
    unauthorized: "The server rejected these credentials. Check the user name or token and try again.",
    invalidUserName: "A user name is 1 to 64 characters: letters, digits, . _ : -",
    missingCredentials: "Enter a user name or an access token.",
    rooms: "Rooms",
    noRooms: "No rooms yet. Join one below.",
    joinRoom: "Join a room",
    roomName: "Room name",
    join: "Join",
    invalidRoomName: "A room name is 1 to 64 characters: letters, digits, . _ : -",
    leave: "Leave room",
    backToRooms: "Rooms",
    unreadCount: "{count} unread",
    noRoomSelected: "Pick a room from the list, or join one by name.",
    onlineCount: "{count} online",
    onlineNobody: "Nobody else is online",
    you: "you",
    messages: "Messages in {room}",
    message: "Message",
    messagePlaceholder: "Write a message. Enter sends, Shift+Enter adds a line.",
    send: "Send",
    loadingOlder: "Loading older messages…",
    beginningOfRoom: "This is the beginning of the room.",
    loadOlder: "Load older messages",
    today: "Today",
    yesterday: "Yesterday",
    statusSending: "Sending",
    statusSent: "Sent",
    statusDelivered: "Delivered",
    statusRead: "Read",
    statusReadBy: "Read by {count}",
    statusFailed: "Not sent: {reason}",
    statusDetails: "Delivered to {delivered} of {members} members, read by {read}",
    retry: "Retry",
    discard: "Discard",
    bodyTooLarge: "The message is too long: {size} bytes, the maximum is {max}.",
    bodyInvalid: "The message contains a character that cannot be sent (U+0000).",
    connConnecting: "Connecting…",
    connConnected: "Connected",
    connReconnecting: "Reconnecting in {seconds} s",
    connOffline: "Offline, reconnecting in {seconds} s",
    connSignedOut: "Signed out",
    connReconnectingShort: "Reconnecting",
    connOfflineShort: "Offline",
    reconnectNow: "Reconnect now",
    newMessage: "{from} in {room}: {body}",
    roomLeft: "You left {room}.",
    errorGeneric: "The server reported an error: {message}",
    "error.invalid_field": "the server rejected a field",
    "error.too_large": "too large",
    "error.id_conflict": "the message id was already used for a different message",
    "error.not_joined": "you are not a member of this room",
    "error.forbidden": "you are not allowed in this room",
    "error.rate_limited": "sending too fast, retrying shortly",
    "error.overloaded": "the server is busy",
    "error.internal": "server error",
    "error.unauthorized": "not signed in",
  },
  "zh-CN": {
    appName: "Parley",
    language: "语言",
    skipToComposer: "跳到输入框",
    signInTitle: "登录",
    signInIntro: "选择一个用户名在此服务器上聊天，或使用访问令牌登录。",
    userName: "用户名",
    userNameHint: "1 到 64 个字符：字母、数字、. _ : -",
    useToken: "使用访问令牌登录",
    token: "访问令牌",
    signIn: "登录",
    signOut: "退出登录",
    signedInAs: "当前用户：{user}",
    tokenRequired: "此服务器需要访问令牌，请在下方输入。",
    unauthorized: "服务器拒绝了这些凭据。请检查用户名或令牌后重试。",
    invalidUserName: "用户名为 1 到 64 个字符：字母、数字、. _ : -",
    missingCredentials: "请输入用户名或访问令牌。",
    rooms: "聊天室",
    noRooms: "还没有聊天室。请在下方加入一个。",
    joinRoom: "加入聊天室",
    roomName: "聊天室名称",
    join: "加入",
    invalidRoomName: "聊天室名称为 1 到 64 个字符：字母、数字、. _ : -",
    leave: "退出聊天室",
    backToRooms: "聊天室",
    unreadCount: "{count} 条未读",
    noRoomSelected: "从列表中选择一个聊天室，或按名称加入。",
    onlineCount: "{count} 人在线",
    onlineNobody: "没有其他人在线",
    you: "你",
    messages: "{room} 中的消息",
    message: "消息",
    messagePlaceholder: "输入消息。按 Enter 发送，Shift+Enter 换行。",
    send: "发送",
    loadingOlder: "正在加载更早的消息…",
    beginningOfRoom: "这是聊天室的开头。",
    loadOlder: "加载更早的消息",
    today: "今天",
    yesterday: "昨天",
    statusSending: "发送中",
    statusSent: "已发送",
    statusDelivered: "已送达",
    statusRead: "已读",
    statusReadBy: "{count} 人已读",
    statusFailed: "未发送：{reason}",
    statusDetails: "已送达 {delivered}/{members} 位成员，{read} 人已读",
    retry: "重试",
    discard: "删除",
    bodyTooLarge: "消息太长：{size} 字节，上限为 {max} 字节。",
    bodyInvalid: "消息中含有无法发送的字符（U+0000）。",
    connConnecting: "正在连接…",
    connConnected: "已连接",
    connReconnecting: "{seconds} 秒后重新连接",
    connOffline: "已离线，{seconds} 秒后重新连接",
    connSignedOut: "已退出登录",
    connReconnectingShort: "正在重新连接",
    connOfflineShort: "已离线",
    reconnectNow: "立即重新连接",
    newMessage: "{from} 在 {room}：{body}",
    roomLeft: "你已退出 {room}。",
    errorGeneric: "服务器报告了一个错误：{message}",
    "error.invalid_field": "服务器拒绝了某个字段",
    "error.too_large": "内容过大",
    "error.id_conflict": "该消息 ID 已被另一条消息使用",
    "error.not_joined": "你不是此聊天室的成员",
    "error.forbidden": "你无权进入此聊天室",
    "error.rate_limited": "发送过快，稍后自动重试",
    "error.overloaded": "服务器繁忙",
    "error.internal": "服务器错误",
    "error.unauthorized": "未登录",
  },
};

export const LANGUAGES = [
  { code: "en", label: "English" },
  { code: "zh-CN", label: "简体中文" },
];

const LANGUAGE_KEY = "parley.lang";

let current = "en";

/** Picks the saved language, else the first of the browser's languages that the page has. */
export function detectLanguage(storage, navigatorLanguages) {
  const saved = storage.get(LANGUAGE_KEY);
  if (typeof saved === "string" && saved in STRINGS) {
    return saved;
  }
  for (const tag of navigatorLanguages) {
    const lower = String(tag).toLowerCase();
    if (lower.startsWith("zh")) {
      return "zh-CN";
    }
    if (lower.startsWith("en")) {
      return "en";
    }
  }
  return "en";
}

export function setLanguage(code, storage) {
  current = code in STRINGS ? code : "en";
  if (storage) {
    storage.set(LANGUAGE_KEY, current);
  }
  return current;
}

export function getLanguage() {
  return current;
}

/** Translates `key` into the current language and fills `{name}` placeholders from `vars`. */
export function t(key, vars = {}) {
  const template = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  return template.replace(/\{(\w+)\}/g, (whole, name) => (name in vars ? String(vars[name]) : whole));
}

export function hasKey(key) {
  return key in STRINGS.en;
}

export function formatTime(ms) {
  return new Intl.DateTimeFormat(current, { hour: "2-digit", minute: "2-digit" }).format(new Date(ms));
}

export function formatFullDate(ms) {
  return new Intl.DateTimeFormat(current, { dateStyle: "full", timeStyle: "medium" }).format(new Date(ms));
}

/** Returns the local calendar day of `ms` as a sortable key such as "2025-12-06". */
export function dayKey(ms) {
  const date = new Date(ms);
  const month = String(date.getMonth() + 1).padStart(2, "0");
  const day = String(date.getDate()).padStart(2, "0");
  return `${date.getFullYear()}-${month}-${day}`;
}

/** Labels a day separator: "Today", "Yesterday" or the local date in the current language. */
export function formatDay(ms, nowMs = Date.now()) {
  const key = dayKey(ms);
  if (key === dayKey(nowMs)) {
    return t("today");
  }
  const yesterday = new Date(nowMs);
  yesterday.setDate(yesterday.getDate() - 1);
  if (key === dayKey(yesterday.getTime())) {
    return t("yesterday");
  }
  return new Intl.DateTimeFormat(current, { dateStyle: "full" }).format(new Date(ms));
}

/** Copies every `data-i18n` key into its element's text and every `data-i18n-*` key into that attribute. */
export function translateDocument(root) {
  for (const element of root.querySelectorAll("[data-i18n]")) {
    element.textContent = t(element.dataset.i18n);
  }
  for (const element of root.querySelectorAll("[data-i18n-placeholder]")) {
    element.placeholder = t(element.dataset.i18nPlaceholder);
  }
  for (const element of root.querySelectorAll("[data-i18n-aria-label]")) {
    element.setAttribute("aria-label", t(element.dataset.i18nAriaLabel));
  }
  for (const element of root.querySelectorAll("[data-i18n-title]")) {
    element.title = t(element.dataset.i18nTitle);
  }
}

export const STRING_TABLES = STRINGS;
